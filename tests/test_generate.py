"""Generation over MLA's latent cache: HF parity, cache/forward consistency, sampling, routing replay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsjax
from dsjax.inference import generate as gen
from dsjax.model.cache import cache_bytes_per_token, init_cache
from hf_reference import HFReference, topk_boundary_ties

NEW = 12  # tokens generated per test


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A tiny random V3 checkpoint (with an MTP module) and its HF reference, shared by the V3 tests."""
    directory = tmp_path_factory.mktemp("tiny_v3")
    reference = HFReference(dsjax.make_config("tiny_v3"), str(directory), seed=1)
    return reference, dsjax.load(str(directory))


def _mixed_prompts(vocab, lengths, seed):
    """Prompts of different lengths, left-padded with *random* tokens (padding content must not matter)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, n) for n in lengths]
    padded, lengths = gen.left_pad(prompts)
    width = padded.shape[1]
    for row, n in enumerate(lengths):
        padded[row, :width - n] = rng.integers(0, vocab, width - n)
    return prompts, padded, lengths


def _hf_greedy(reference, prompt, new_tokens):
    """HF transformers' greedy `generate` (with its KV cache) on one unpadded prompt."""
    ids = torch.as_tensor(np.asarray(prompt)[None], dtype=torch.long)
    reference.model.generation_config.eos_token_id = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead (and suffer most on a busy machine)
    try:
        with torch.no_grad():
            out = reference.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                           do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        torch.set_num_threads(threads)
    return out.numpy()[0, len(prompt):]


def _log_softmax_at(logits, tokens):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]


def _check_greedy_batch_against_hf_and_forward(reference, lm, lengths, seed):
    """One left-padded batch of mixed prompt lengths, greedy: every row equals HF generating from that
    prompt alone, and the cached decode's logits equal a full forward pass at every step."""
    config = lm.config
    prompts, padded, lengths = _mixed_prompts(config.vocab_size, lengths, seed)
    width = padded.shape[1]
    out = lm.generate(padded, NEW, temperature=0.0, prompt_lengths=lengths, return_logits=True)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (len(prompts), width + NEW)
    np.testing.assert_array_equal(tokens[:, :width], padded)
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(tokens[row, width:], _hf_greedy(reference, prompt, NEW), err_msg=f"row {row}")
    assert not np.asarray(out.done).any() and (np.asarray(out.lengths) == NEW).all()
    assert (np.asarray(out.sampling_logprobs) == 0).all() and (np.asarray(out.kept_count) == 1).all()

    # The same sequences through the training forward pass (padding as segment 0).
    full = np.asarray(lm(tokens[:, :-1], segment_ids=np.asarray(out.segment_ids)[:, :-1]))[:, width - 1:]
    cached = np.asarray(out.logits)
    scale = np.abs(full).max()
    np.testing.assert_allclose(cached, full, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(np.asarray(out.logprobs), _log_softmax_at(full, tokens[:, width:]), rtol=0, atol=1e-5)
    return prompts, tokens, full


def test_v3_greedy_matches_hf_with_mixed_prompt_lengths(v3):
    reference, lm = v3
    _check_greedy_batch_against_hf_and_forward(reference, lm, lengths=[9, 4, 6], seed=0)


def test_v32_greedy_matches_hf_with_sparse_decode(tmp_path):
    config = dsjax.make_config("tiny_v32", index_num_heads=8, num_mtp_layers=0)
    reference = HFReference(config, str(tmp_path), seed=3)
    lm = dsjax.load(str(tmp_path))
    lengths = [9, 5, 8]
    assert config.index_topk < min(lengths) + NEW - 1  # the decode steps select among the cache (sparse path)
    prompts, tokens, full = _check_greedy_batch_against_hf_and_forward(reference, lm, lengths, seed=4)
    # No exact indexer tie at the k-th key on these sequences: any mismatch above is a real bug.
    width = tokens.shape[1] - NEW
    for row, prompt in enumerate(prompts):
        sequence = np.array(tokens[row:row + 1, width - len(prompt):])
        assert topk_boundary_ties(reference.index_scores(sequence), config.index_topk) == 0
    # Sparse selection changes these logits: attending to every cached key would not match.
    dense = dsjax.load(str(tmp_path), index_topk=tokens.shape[1])
    segments = (np.arange(tokens.shape[1])[None] >= width - np.array(lengths)[:, None]).astype(np.int32)
    dense_logits = np.asarray(dense(tokens[:, :-1], segment_ids=segments[:, :-1]))[:, width - 1:]
    assert np.abs(dense_logits - full).max() > 1e-2 * np.abs(full).max()


def test_cache_holds_only_the_latent():
    for name in ("v3_671b", "v32_671b", "tiny_v32"):
        config = dsjax.make_config(name)
        layers = config.num_layers
        cache = jax.eval_shape(lambda: init_cache(config, 1, 1, jnp.bfloat16))
        stored = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(cache.layers))
        assert cache.segment_ids.shape == (1, 1)  # plus one int32 per column for all layers
        expected = layers * (config.kv_lora_rank + config.qk_rope_head_dim
                             + (config.index_head_dim if config.use_indexer else 0)) * 2
        sizes = cache_bytes_per_token(config)
        assert stored == sizes["total"] == expected
        assert sizes["uncompressed"] == layers * config.num_heads * (
            config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * 2
    v3 = cache_bytes_per_token(dsjax.make_config("v3_671b"))
    assert v3["uncompressed"] / v3["total"] > 70  # 576 values per layer instead of 128 x 320


@pytest.mark.parametrize("preset", ["tiny_v3", "tiny_v32"])
def test_training_forward_prefill_and_every_decode_step_are_one_function(preset):
    """The one model body: the training forward pass, a cached prefill and each cached decode step give
    the same logits at every position (V3.2: sparse top-k attention in all three, over a cache longer
    than index_topk, so decode steps select among cached keys)."""
    config = dsjax.make_config(preset, num_mtp_layers=0)
    params = dsjax.init_params(config, jax.random.key(5))
    prompt_len, total = 6, 16
    tokens = jax.random.randint(jax.random.key(6), (2, total), 0, config.vocab_size)
    if config.use_indexer:
        assert config.index_topk < total - 1
    full = dsjax.forward(params, tokens, config).logits  # training: no cache

    cache = init_cache(config, 2, total)
    prefill = dsjax.forward(params, tokens[:, :prompt_len], config, cache=cache)
    got = [prefill.logits]
    cache = prefill.cache
    assert int(cache.index) == prompt_len and prefill.mtp_logits is None
    decode = jax.jit(lambda p, t, pos, c: dsjax.forward(p, t, config, positions=pos, cache=c))
    for column in range(prompt_len, total):
        out = decode(params, tokens[:, column:column + 1], jnp.full((2, 1), column), cache)
        got.append(out.logits)
        cache = out.cache
    got = np.concatenate([np.asarray(x) for x in got], axis=1)
    scale = np.abs(np.asarray(full)).max()
    np.testing.assert_allclose(got, np.asarray(full), rtol=0, atol=2e-6 * scale)
    # A stale cache (one column not written) would change the answer: the check can fail.
    broken = cache._replace(layers=jax.tree.map(lambda x: x.at[:, :, 1].set(0), cache.layers))
    out = decode(params, tokens[:, -1:], jnp.full((2, 1), total - 1), broken._replace(index=jnp.int32(total - 1)))
    assert np.abs(np.asarray(out.logits[:, 0]) - np.asarray(full[:, -1])).max() > 1e-3 * scale


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def _brute_force_kept(logits, temperature, top_p, top_k):
    """The kept set of temperature -> top-k -> top-p (renormalised), in float64 numpy."""
    kept = np.zeros(logits.shape, bool)
    for row, values in enumerate(np.asarray(logits, np.float64)):
        order = np.argsort(-values, kind="stable")
        if temperature == 0:
            kept[row, order[0]] = True
            continue
        count = top_k if 0 < top_k < len(values) else len(values)
        if top_p < 1:
            z = values[order[:count]] / temperature
            probs = np.exp(z - z.max())
            probs /= probs.sum()
            count = max(1, int(np.sum(np.cumsum(probs) - probs < top_p)))
        kept[row, order[:count]] = True
    return kept


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.9, 0), (0.7, 1.0, 5), (1.3, 0.6, 12), (0.5, 0.8, 3),
                                                       (0.0, 1.0, 0), (1.0, 1.0, 0)])
def test_truncation_mask_matches_brute_force(temperature, top_p, top_k):
    rng = np.random.default_rng(11)
    logits = (rng.normal(size=(48, 40)) * 2).astype(np.float32)
    cutoff = gen.truncation_cutoff(jnp.asarray(logits), temperature=temperature, top_p=top_p, top_k=top_k)
    mask = np.asarray(gen.truncation_mask(jnp.asarray(logits), cutoff))
    want = _brute_force_kept(logits, temperature, top_p, top_k)
    np.testing.assert_array_equal(mask, want)
    assert (want.sum(-1) < logits.shape[-1]).any() == (temperature == 0 or top_p < 1 or top_k > 0)

    # Sampled tokens lie in the kept set; their log-probs are the renormalised truncated ones.
    result = gen.sample(jnp.asarray(logits), jax.random.key(3), temperature=temperature, top_p=top_p, top_k=top_k)
    tokens = np.asarray(result.tokens)
    assert want[np.arange(len(tokens)), tokens].all()
    np.testing.assert_array_equal(np.asarray(result.kept_count), want.sum(-1))
    np.testing.assert_allclose(np.asarray(result.logprobs), _log_softmax_at(logits, tokens), atol=1e-5)
    scaled = np.where(want, logits / (temperature or 1.0), -np.inf)
    np.testing.assert_allclose(np.asarray(result.sampling_logprobs), _log_softmax_at(scaled, tokens), atol=1e-5)


def test_sampling_frequencies_follow_the_truncated_distribution():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(1, 12)).astype(np.float32) * 1.5)
    draws = 6000
    result = jax.vmap(lambda key: gen.sample(logits, key, temperature=0.8, top_p=0.85, top_k=6).tokens[0])(
        jax.random.split(jax.random.key(0), draws))
    counts = np.bincount(np.asarray(result), minlength=12) / draws
    kept = _brute_force_kept(np.asarray(logits), 0.8, 0.85, 6)[0]
    probs = np.where(kept, np.exp(np.asarray(logits[0], np.float64) / 0.8), 0)
    probs /= probs.sum()
    assert (counts[~kept] == 0).all()
    np.testing.assert_allclose(counts, probs, atol=4 * np.sqrt(0.25 / draws))


def test_sampled_generation_is_consistent_with_a_full_forward(v3):
    """Seeds, stop tokens, done, logprobs and truncation masks against the training forward pass,
    replaying the recorded expert choices."""
    _, lm = v3
    config = lm.config
    _, padded, lengths = _mixed_prompts(config.vocab_size, [7, 3, 5, 6], seed=8)
    width = padded.shape[1]
    stops = tuple(range(3, config.vocab_size, 9))  # ~11% of the vocabulary ends a row
    pad = 1
    kw = dict(temperature=0.9, top_p=0.9, top_k=60, stop_tokens=stops, prompt_lengths=lengths, pad_token=pad,
              return_logits=True)
    out = lm.generate(padded, NEW, seed=0, **kw)
    again = lm.generate(padded, NEW, seed=0, **kw)
    other = lm.generate(padded, NEW, seed=1, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(out.tokens) != np.asarray(other.tokens)).any()

    tokens = np.asarray(out.tokens)
    generated, done = tokens[:, width:], np.asarray(out.done)
    stopped_rows = 0
    for row in range(len(tokens)):
        hits = np.flatnonzero(np.isin(generated[row], stops))
        end = hits[0] + 1 if len(hits) else NEW
        stopped_rows += bool(len(hits))
        assert out.lengths[row] == end
        np.testing.assert_array_equal(done[row], np.arange(NEW) >= end)
        assert (generated[row, end:] == pad).all()
    assert 0 < stopped_rows  # the seed makes rows stop early ...
    assert (np.asarray(out.lengths) > 1).sum() >= 2  # ... and others run on

    # Score the output with the training forward, replaying the routing recorded while sampling.
    fwd = lm.forward(tokens[:, :-1], segment_ids=np.asarray(out.segment_ids)[:, :-1],
                     forced_routing=out.expert_indices)
    logits = np.asarray(fwd.logits)[:, width - 1:]
    valid = ~done
    scale = np.abs(logits).max()
    np.testing.assert_allclose(np.asarray(out.logits)[valid], logits[valid], rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], _log_softmax_at(logits, generated)[valid], atol=1e-5)
    # The stored cutoffs rebuild the sampler's masks (brute force on the sampler's logits) and also
    # the same masks from the forward pass's logits; the pi_theta helper reproduces pi_old.
    cutoff = out.truncation_cutoff
    sampler_logits = np.asarray(out.logits)[valid]
    want = _brute_force_kept(sampler_logits, 0.9, 0.9, 60)
    np.testing.assert_array_equal(np.asarray(gen.truncation_mask(sampler_logits, np.asarray(cutoff)[valid])), want)
    rebuilt = np.asarray(gen.truncation_mask(jnp.asarray(logits), cutoff))[valid]
    np.testing.assert_array_equal(rebuilt, want)
    np.testing.assert_array_equal(np.asarray(out.kept_count)[valid], want.sum(-1))
    assert want[np.arange(len(want)), generated[valid]].all()
    assert (want.sum(-1) < config.vocab_size).all() and (want.sum(-1) > 1).any()
    pi_theta = gen.sampling_log_probs(jnp.asarray(logits), jnp.asarray(generated), cutoff, 0.9)
    np.testing.assert_allclose(np.asarray(pi_theta)[valid], np.asarray(out.sampling_logprobs)[valid], atol=1e-5)

    # The recorded experts are those a free forward pass picks, at every real input position.
    free = lm.forward(tokens[:, :-1], segment_ids=np.asarray(out.segment_ids)[:, :-1])
    recorded = np.sort(np.asarray(out.expert_indices["moe_layers"]), -1)
    chosen = np.sort(np.asarray(free.aux["moe_layers"]["expert_indices"]), -1)
    for row, n in enumerate(lengths):
        span = slice(width - n, width - 1 + int(out.lengths[row]))
        np.testing.assert_array_equal(recorded[:, row, span], chosen[:, row, span])


# ----------------------------------------------------------------------------------------------
# Forced routing in the training forward pass
# ----------------------------------------------------------------------------------------------


def test_forced_routing_replays_exactly_and_other_experts_change_outputs(v3):
    _, lm = v3
    config = lm.config
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 13))
    free = lm.forward(tokens)
    recorded = {name: aux["expert_indices"] for name, aux in free.aux.items()}
    assert set(recorded) == {"moe_layers", "mtp_0"}
    replay = lm.forward(tokens, forced_routing=recorded)
    np.testing.assert_array_equal(np.asarray(replay.logits), np.asarray(free.logits))
    np.testing.assert_array_equal(np.asarray(replay.mtp_logits), np.asarray(free.mtp_logits))
    for name in recorded:
        np.testing.assert_array_equal(np.asarray(replay.aux[name]["expert_indices"]), np.asarray(recorded[name]))

    # Route every token of the main model's MoE layers to other experts: the main logits change.
    shifted = dict(recorded, moe_layers=(recorded["moe_layers"] + 1) % config.num_routed_experts)
    moved = lm.forward(tokens, forced_routing=shifted)
    np.testing.assert_array_equal(np.asarray(moved.aux["moe_layers"]["expert_indices"]),
                                  np.asarray(shifted["moe_layers"]))
    scale = np.abs(np.asarray(free.logits)).max()
    assert np.abs(np.asarray(moved.logits) - np.asarray(free.logits)).max() > 1e-2 * scale
    # Only the MTP module's routing changed: main logits stay, MTP logits move.
    shifted_mtp = dict(recorded, mtp_0=(recorded["mtp_0"] + 1) % config.num_routed_experts)
    moved_mtp = lm.forward(tokens, forced_routing=shifted_mtp)
    np.testing.assert_array_equal(np.asarray(moved_mtp.logits), np.asarray(free.logits))
    assert np.abs(np.asarray(moved_mtp.mtp_logits) - np.asarray(free.mtp_logits)).max() > 1e-2 * scale


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------


def test_cli_streams_the_greedy_continuation(v3, capsys):
    """`python -m experiments.generate` on a checkpoint without tokenizer.json: byte tokenizer, raw
    prompt after BOS, tokens printed by the in-loop callback as they come; greedy is greedy."""
    from dsjax.data import ByteTokenizer
    from experiments import generate as cli

    reference, lm = v3
    args = ["--checkpoint", reference.directory, "--prompt", "Hi", "--max_new_tokens", "10", "--temperature", "0"]
    out, ids = cli.run(cli.parse_args(args))
    printed = capsys.readouterr().out
    tokenizer = ByteTokenizer()
    assert ids == [tokenizer.bos_id] + list(b"Hi")
    tokens = np.asarray(out.tokens)[0]
    generated = tokens[len(ids):len(ids) + int(out.lengths[0])]
    text = tokenizer.decode(generated[generated != tokenizer.eos_id])
    assert text.strip() and printed == text + "\n"
    # Each generated token is the argmax of a full forward pass over what precedes it.
    logits = np.asarray(lm(tokens[None, :-1]))[0, len(ids) - 1:len(ids) - 1 + len(generated)]
    np.testing.assert_array_equal(logits.argmax(-1), generated)
