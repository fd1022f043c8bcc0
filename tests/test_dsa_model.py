"""DeepSeek Sparse Attention in the model: the kernel implementations agree (values and gradients),
the DSA training stages compute what the V3.2 report defines, and their gradients are isolated.

HF parity of the sparse path (both `attention_impl`s) is in test_parity_hf.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.model.mla import MLA, softmax_scale
from dsjax.model.rope import apply_rope, rope_tables
from dsjax.model.transformer import forward, frozen, positions_from_segments

# Packed documents, padding (segment 0) and T = 21: not a multiple of any kernel block; with
# index_topk = 7 each document's first 6 queries see fewer than k keys.
SEGMENTS = np.array([[1] * 8 + [2] * 10 + [0] * 3, [1] * 21])


def _config(**overrides):
    # One dense and one MoE layer, plus the MTP module's: every kind of aux entry. Larger weights
    # than the default init: attention and index scores far from uniform.
    fields = dict(num_layers=2, index_num_heads=8, initializer_range=0.1, moe_impl="dense")
    return dsjax.make_config("tiny_v32", **{**fields, **overrides})


def _tokens(config, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, config.vocab_size, SEGMENTS.shape))


def _lm_loss(out, tokens, segment_ids):
    """Next-token cross-entropy over real tokens whose successor is in the same document."""
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    counted = ((segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)).astype(jnp.float32)
    return -jnp.sum(picked * counted) / jnp.sum(counted)


def _indexer_kl(out):
    kl = [jnp.ravel(stats["indexer_kl"]) for stats in out.aux.values() if "indexer_kl" in stats]
    return jnp.mean(jnp.concatenate(kl))


def _is_indexer(path) -> bool:
    return "indexer" in jax.tree_util.keystr(path)


def _leaves(tree, indexer: bool):
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if _is_indexer(path) == indexer]


def _losses(params, config, stage):
    """([LM loss, mean indexer KL], ModelOutput) on the packed test batch."""
    tokens, segment_ids = _tokens(config), jnp.asarray(SEGMENTS)
    out = forward(params, tokens, config, segment_ids=segment_ids, dsa_stage=stage)
    return jnp.stack([_lm_loss(out, tokens, segment_ids), _indexer_kl(out)]), out


def _split(jacobian):
    """The jacobian of `_losses` (leaves [2, ...]) -> (LM loss gradient, indexer KL gradient)."""
    return jax.tree.map(lambda g: g[0], jacobian), jax.tree.map(lambda g: g[1], jacobian)


def _check_isolation(lm_grad, kl_grad):
    """Gradients of the LM loss and of the indexer KL w.r.t. params: the KL reaches only the
    indexers (every indexer leaf), the LM loss never reaches them."""
    for leaf in _leaves(kl_grad, indexer=False):
        np.testing.assert_array_equal(leaf, 0.0)
    assert all(np.abs(leaf).max() > 0 for leaf in _leaves(kl_grad, indexer=True))
    for leaf in _leaves(lm_grad, indexer=True):
        np.testing.assert_array_equal(leaf, 0.0)
    assert np.abs(lm_grad["moe_layers"]["attention"]["kv_b_proj"]["kernel"]).max() > 0


@functools.lru_cache(maxsize=None)
def _params(**overrides):
    return dsjax.init_params(_config(**overrides), jax.random.key(0), sequence_length=SEGMENTS.shape[1])


def test_attention_impl_and_dsa_stage_are_validated():
    with pytest.raises(ValueError, match="attention_impl='triton' must be 'xla'.*or 'pallas'"):
        dsjax.make_config("tiny_v32", attention_impl="triton")
    config = _config()
    with pytest.raises(ValueError, match="dsa_stage='warm-up' must be one of"):
        forward(None, _tokens(config), config, dsa_stage="warm-up")  # refused before params are read


def test_pallas_matches_xla_values_and_gradients_and_sparse_stage_isolation():
    """The whole model in the sparse stage with attention_impl="pallas" (kernels in interpret mode)
    against "xla": same logits and DSA statistics, same gradient of LM loss + indexer KL (sparse_mla's
    custom VJP, the targets, the indexer scores at the selection). The LM loss gives the indexer
    exactly 0 gradient and the KL gives every other parameter exactly 0 (so comparing the sum
    compares both parts)."""
    params = _params()
    xla_losses = functools.partial(_losses, config=_config(attention_impl="xla"), stage="sparse")
    jacobian, out_xla = jax.jit(jax.jacrev(xla_losses, has_aux=True))(params)
    lm_grad, kl_grad = _split(jacobian)
    _check_isolation(lm_grad, kl_grad)
    pallas_losses = functools.partial(_losses, config=_config(attention_impl="pallas"), stage="sparse")
    total = lambda p: (lambda values, out: (jnp.sum(values), out))(*pallas_losses(p))  # noqa: E731
    grad_pallas, out_pallas = jax.jit(jax.grad(total, has_aux=True))(params)

    np.testing.assert_allclose(out_pallas.logits, out_xla.logits, rtol=0, atol=2e-5 * np.abs(out_xla.logits).max())
    for key, stats in out_xla.aux.items():
        for name in ("indexer_kl", "topk_attention_recall"):
            np.testing.assert_allclose(out_pallas.aux[key][name], stats[name], rtol=2e-5, atol=1e-7)
    assert float(_indexer_kl(out_xla)) > 1e-3  # not a degenerate (uniform) case
    got = dict(jax.tree_util.tree_leaves_with_path(grad_pallas))
    for path, want in jax.tree_util.tree_leaves_with_path(jax.tree.map(jnp.add, lm_grad, kl_grad)):
        scale = float(np.abs(want).max()) or 1.0
        np.testing.assert_allclose(got[path], want, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_dense_stage_is_the_v3_math():
    """dsa_stage="dense": exactly the model without an indexer (V3 attention), and equal to the
    sparse path when the top-k keeps every key; the default top-k does change the logits."""
    config = _config()
    params = _params()
    tokens, segment_ids = _tokens(config), jnp.asarray(SEGMENTS)
    run = jax.jit(lambda p, config, stage: forward(p, tokens, config, segment_ids=segment_ids, dsa_stage=stage),
                  static_argnums=(1, 2))
    dense = run(params, frozen(config), "dense")
    assert not any("indexer_kl" in stats for stats in dense.aux.values())

    v3_config = dsjax.make_config(config, use_indexer=False)
    drop = lambda tree: {k: drop(v) for k, v in tree.items() if k != "indexer"} if isinstance(tree, dict) else tree
    v3 = run(drop(params), frozen(v3_config), None)
    np.testing.assert_array_equal(dense.logits, v3.logits)
    np.testing.assert_array_equal(dense.mtp_logits, v3.mtp_logits)

    scale = float(np.abs(dense.logits).max())
    every_key = run(params, frozen(dsjax.make_config(config, index_topk=SEGMENTS.shape[1])), None)
    np.testing.assert_allclose(every_key.logits, dense.logits, rtol=0, atol=1e-5 * scale)
    sparse = run(params, frozen(config), None)
    assert np.abs(np.asarray(sparse.logits) - np.asarray(dense.logits)).max() > 1e-3 * scale


def test_full_topk_gives_recall_one_and_the_warmup_kl():
    """With index_topk >= T the top-k keeps all the dense mass (recall 1), and the sparse stage's KL
    over S_t is the warm-up's KL over every visible key."""
    config = _config(index_topk=SEGMENTS.shape[1])
    params, tokens, segment_ids = _params(), _tokens(config), jnp.asarray(SEGMENTS)
    run = jax.jit(lambda p, stage: forward(p, tokens, config, segment_ids=segment_ids, dsa_stage=stage),
                  static_argnums=1)
    warmup, sparse = run(params, "warmup"), run(params, "sparse")
    for key, stats in warmup.aux.items():
        if "indexer_kl" not in stats:
            continue
        np.testing.assert_allclose(stats["topk_attention_recall"], 1.0, rtol=1e-6)
        np.testing.assert_allclose(sparse.aux[key]["topk_attention_recall"], 1.0, rtol=1e-6)
        np.testing.assert_allclose(sparse.aux[key]["indexer_kl"], stats["indexer_kl"], rtol=1e-4)
    assert set(warmup.aux) == {"dense_layers", "moe_layers", "mtp_0"}


# ---------------------------------------------------------------------------------------------
# The stages' statistics against a brute-force computation, one MLA layer.
# ---------------------------------------------------------------------------------------------


def _softmax(s, mask, axis=-1):
    s = np.where(mask, s, -np.inf)
    e = np.exp(s - s.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _brute_force_stats(config, variables, captured, cos, sin, segment_ids, stage):
    """(indexer_kl, topk_attention_recall) in float64 numpy from dense [B, H, T, S] probabilities
    (expanded MLA form) and the full [B, T, S] index scores."""
    c = config
    nope, lora = c.qk_nope_head_dim, c.kv_lora_rank
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    q = captured["q_b_proj"]["__call__"][0]
    kv = captured["kv_a_proj"]["__call__"][0]
    kv_latent = f64(captured["kv_a_norm"]["__call__"][0])
    queries, keys, weights = (f64(a) for a in captured["indexer"]["__call__"][0])
    q_nope, q_rope = f64(q[..., :nope]), f64(apply_rope(q[..., nope:], cos, sin, interleaved=True))
    k_rope = f64(apply_rope(kv[..., lora:], cos, sin, interleaved=True))
    kv_b = f64(variables["params"]["kv_b_proj"]["kernel"])
    k_nope = np.einsum("bsc,chd->bshd", kv_latent, kv_b[..., :nope])

    batch, length = segment_ids.shape
    visible = np.tril(np.ones((length, length), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = (np.einsum("bthd,bshd->bhts", q_nope, k_nope) + np.einsum("bthr,bsr->bhts", q_rope, k_rope))
    head_probs = _softmax(scores * softmax_scale(c), visible[:, None])  # [B, H, T, S]
    p = head_probs.mean(1)

    logits = np.maximum(np.einsum("bthd,bsd->bths", queries, keys) * c.index_head_dim ** -0.5, 0.0)
    index = np.where(visible, np.einsum("bths,bth->bts", logits, weights), -np.inf)
    k = min(c.index_topk, length)
    selected = np.zeros_like(visible)
    for b in range(batch):
        for t in range(length):
            order = sorted(np.flatnonzero(visible[b, t]), key=lambda s: (-index[b, t, s], s))
            if len(order) > k:  # a tie at the k-th key would make the selection ambiguous
                assert index[b, t, order[k - 1]] != index[b, t, order[k]]
            selected[b, t, order[:k]] = True
    recall = (p * selected).sum(-1)

    if stage == "warmup":
        target, support = p, visible
    else:  # the sparse attention's own probabilities over S_t, summed over heads, L1-normalised
        target = _softmax(scores * softmax_scale(c), selected[:, None]).mean(1)
        support = selected
    with np.errstate(divide="ignore"):
        log_q = np.log(_softmax(index, support))
    kl = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1.0)) - np.where(support, log_q, 0.0)), 0.0)
    valid = segment_ids > 0
    return kl.sum(-1)[valid].mean(), recall[valid].mean()


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_stage_statistics_match_brute_force(stage, impl):
    config = _config(initializer_range=0.3, attention_impl=impl)
    segment_ids = SEGMENTS
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(segment_ids.shape + (config.hidden_size,)), jnp.float32)
    cos, sin = rope_tables(positions_from_segments(jnp.asarray(segment_ids)), config)
    module = MLA(frozen(config), dsa_stage=stage)
    variables = nn.unbox(jax.jit(module.init)(jax.random.key(2), x, cos, sin, jnp.asarray(segment_ids)))
    apply = jax.jit(functools.partial(module.apply, capture_intermediates=True, mutable=["intermediates"]))
    (out, aux, _), state = apply(variables, x, cos, sin, jnp.asarray(segment_ids))
    kl, recall = _brute_force_stats(config, variables, state["intermediates"], cos, sin, segment_ids, stage)
    assert kl > 0.05 and 0.2 < recall < 0.99  # far from the degenerate cases
    np.testing.assert_allclose(aux["indexer_kl"], kl, rtol=2e-5)
    np.testing.assert_allclose(aux["topk_attention_recall"], recall, rtol=2e-5)
    # The stage changes only what is reported: the output is the plain sparse / dense one.
    plain, _, _ = jax.jit(MLA(frozen(config), dsa_stage=None if stage == "sparse" else "dense").apply)(
        variables, x, cos, sin, jnp.asarray(segment_ids))
    np.testing.assert_array_equal(out, plain)


# ---------------------------------------------------------------------------------------------
# Gradient isolation.
# ---------------------------------------------------------------------------------------------


def test_warmup_gradients_are_isolated():
    """warmup: the KL gives every non-indexer parameter exactly 0 gradient (and the LM loss, of a
    dense attention that does not use the indexer, gives the indexer 0)."""
    jacobian, _ = jax.jit(jax.jacrev(functools.partial(_losses, config=_config(), stage="warmup"), has_aux=True))(
        _params())
    _check_isolation(*_split(jacobian))


def test_pallas_decode_matches_xla():
    """Generation over the latent cache runs the same kernels (indexer_topk and sparse_mla with the
    query offset and left padding as segment 0): greedy tokens and logits agree."""
    from dsjax.inference import generate
    from dsjax.api import LanguageModel

    rng = np.random.default_rng(3)
    padded, lengths = generate.left_pad([rng.integers(0, 259, n) for n in (9, 5)])
    outputs = []
    for impl in ("xla", "pallas"):
        config = _config(attention_impl=impl, num_mtp_layers=0)
        lm = LanguageModel(config=config, params={k: v for k, v in _params().items() if k != "mtp_0"})
        outputs.append(lm.generate(padded, 8, temperature=0.0, prompt_lengths=lengths, return_logits=True))
    xla, pallas = outputs
    assert padded.shape[1] + 8 > _config().index_topk  # decode steps choose among the cache
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    np.testing.assert_allclose(pallas.logits, xla.logits, rtol=0, atol=1e-5 * np.abs(xla.logits).max())


@pytest.mark.parametrize("stage", [None, "sparse"])
def test_sparse_layer_memory_is_linear_in_length(stage):
    """Forward + backward of an indexer layer (the sparse stage with its KL) at T = 32768, k = 64:
    XLA's compiled temporaries (~0.2 GiB) stay far below one [T, T] float32 tensor (4 GiB), let
    alone the [H, T, T] of dense attention. (The indexer's O(T^2) scoring runs chunk by chunk.)"""
    config = frozen(_config(index_topk=64))
    length = 32768
    x = jax.ShapeDtypeStruct((1, length, config.hidden_size), jnp.float32)
    segment_ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    module = MLA(config, dsa_stage=stage)

    def loss(params, x, segment_ids):
        cos, sin = rope_tables(positions_from_segments(segment_ids), config)
        out, aux, _ = module.apply({"params": params}, x, cos, sin, segment_ids)
        return jnp.mean(out) + sum(aux.values(), 0.0)

    def init(x, segment_ids):
        cos, sin = rope_tables(positions_from_segments(segment_ids), config)
        return nn.unbox(module.init(jax.random.key(0), x, cos, sin, segment_ids))["params"]

    params = jax.eval_shape(init, x, segment_ids)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, segment_ids).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries < length * length * 4 / 8, temporaries
