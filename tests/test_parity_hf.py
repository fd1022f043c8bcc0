"""dsjax.load on official-layout HF checkpoints gives HF transformers' logits (float32, CPU)."""

import numpy as np
import pytest

import dsjax
from hf_reference import HFReference, topk_boundary_ties


def _tolerance(reference):
    return 1e-4 * float(np.abs(reference).max())


def _tokens(config, batch, length, seed):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


def _check(reference, lm, tokens):
    want, want_mtp = reference.logits(tokens)
    got = lm.forward(tokens)
    assert got.logits.shape == want.shape
    np.testing.assert_allclose(np.asarray(got.logits), want, rtol=0, atol=_tolerance(want))
    if want_mtp is not None:
        assert got.mtp_logits is not None and got.mtp_logits.shape == want_mtp.shape
        np.testing.assert_allclose(np.asarray(got.mtp_logits), want_mtp, rtol=0, atol=_tolerance(want_mtp))
    return got


@pytest.mark.parametrize("q_lora_rank", [22, None])
def test_v3_matches_hf(tmp_path, q_lora_rank):
    config = dsjax.make_config("tiny_v3", q_lora_rank=q_lora_rank)
    reference = HFReference(config, str(tmp_path), seed=1)
    lm = dsjax.load(str(tmp_path))
    assert lm.config.num_mtp_layers == 1
    # The router bias is non-zero and changes choices: the test would catch a router that ignored it.
    bias = np.asarray(lm.params["moe_layers"]["mlp"]["router"]["e_score_correction_bias"])
    assert np.abs(bias).min() > 0
    _check(reference, lm, _tokens(config, 2, 23, seed=0))


def test_v32_matches_hf_with_sparse_attention(tmp_path):
    """Both DSA kernel implementations: batch 2, T = 23 (not a multiple of any kernel block), the
    first index_topk - 1 queries see fewer than k keys."""
    config = dsjax.make_config("tiny_v32", index_num_heads=8)
    reference = HFReference(config, str(tmp_path), seed=3)
    tokens = _tokens(config, 2, 23, seed=5)
    assert config.index_topk < tokens.shape[1]
    # Exact score ties at the k-th key make the selection implementation-defined (torch and XLA
    # break them differently); this input has none, so any mismatch is a real bug.
    assert topk_boundary_ties(reference.index_scores(tokens), config.index_topk) == 0
    lm = dsjax.load(str(tmp_path))
    got = _check(reference, lm, tokens)
    pallas = _check(reference, dsjax.load(str(tmp_path), attention_impl="pallas"), tokens)
    np.testing.assert_allclose(np.asarray(pallas.logits), np.asarray(got.logits), rtol=0,
                               atol=1e-5 * float(np.abs(np.asarray(got.logits)).max()))
    # The sparse path is really taken: attending to every key gives other logits.
    dense = dsjax.load(str(tmp_path), index_topk=tokens.shape[1])
    assert np.abs(np.asarray(dense(tokens)) - np.asarray(got.logits)).max() > 100 * _tolerance(np.asarray(got.logits))


def test_index_scores_match_hf(tmp_path):
    """The indexer itself, layer by layer, before any top-k. The model never forms the [T, T]
    scores: the test captures each indexer's (q_I, k_I, w) and scores them here."""
    import jax.numpy as jnp
    from dsjax.model.indexer import LightningIndexer
    from dsjax.model.transformer import build

    config = dsjax.make_config("tiny_v32", index_num_heads=4)
    reference = HFReference(config, str(tmp_path), seed=7)
    tokens = _tokens(config, 2, 17, seed=2)
    want = reference.index_scores(tokens)
    lm = dsjax.load(str(tmp_path), index_topk=17)  # dense attention: both sides see the same hidden states
    reference.model.config.index_topk = 17
    for layer in reference.model.model.layers:
        layer.self_attn.indexer.index_topk = 17
    want = reference.index_scores(tokens)
    _, state = build(lm.config).apply({"params": lm.params}, jnp.asarray(tokens), mutable=["intermediates"],
                                      capture_intermediates=lambda module, _: isinstance(module, LightningIndexer))
    stacks = state["intermediates"]
    causal = np.tril(np.ones((tokens.shape[1],) * 2, bool))
    got = []
    for name in ("dense_layers", "moe_layers"):
        parts = stacks[name]["attention"]["indexer"]["__call__"][0]  # (q_I, k_I, w), a leading layers axis
        queries, keys, weights = (np.asarray(a, np.float64) for a in parts)
        logits = np.maximum(np.einsum("lbthd,lbsd->lbths", queries, keys) * config.index_head_dim ** -0.5, 0.0)
        got += list(np.where(causal, np.einsum("lbths,lbth->lbts", logits, weights), -np.inf))
    assert len(got) == len(want) == config.num_layers
    for g, w in zip(got, want):
        visible = w > np.finfo(np.float32).min / 2
        assert np.array_equal(np.isfinite(g), visible)
        np.testing.assert_allclose(g[visible], w[visible], rtol=1e-5, atol=1e-6)


def test_packed_documents_match_separate_hf_runs(tmp_path):
    """Two documents packed in one row give each document's own HF logits: no attention across them
    (each document's early queries see fewer than k keys; padding at the end). Both DSA kernel
    implementations."""
    config = dsjax.make_config("tiny_v32", index_num_heads=8, num_mtp_layers=0)
    reference = HFReference(config, str(tmp_path), seed=4)
    first, second = _tokens(config, 1, 9, seed=8), _tokens(config, 1, 12, seed=9)
    packed = np.concatenate([first, second, np.zeros((1, 3), int)], axis=1)  # + 3 padding tokens
    segment_ids = np.array([[1] * 9 + [2] * 12 + [0] * 3])
    for doc in (first, second):
        assert topk_boundary_ties(reference.index_scores(doc), config.index_topk) == 0
    wants = [reference.logits(doc)[0] for doc in (first, second)]
    for attention_impl in ("xla", "pallas"):
        logits = np.asarray(dsjax.load(str(tmp_path), attention_impl=attention_impl)(packed, segment_ids=segment_ids))
        for want, span in zip(wants, (slice(0, 9), slice(9, 21))):
            np.testing.assert_allclose(logits[:, span], want, rtol=0, atol=_tolerance(want), err_msg=attention_impl)


def test_bfloat16_compute_is_close_to_float32(tmp_path):
    config = dsjax.make_config("tiny_v3")
    HFReference(config, str(tmp_path), seed=2)
    tokens = _tokens(config, 2, 16, seed=3)
    full = np.asarray(dsjax.load(str(tmp_path))(tokens))
    half = dsjax.load(str(tmp_path), dtype="bfloat16", param_dtype="bfloat16")
    assert half.params["embed"]["embedding"].dtype == np.dtype("bfloat16")
    low = np.asarray(half(tokens))
    assert low.dtype == np.float32
    # bf16 weights and activations carry ~3 significant digits: close, not equal.
    scale = np.abs(full).max()
    assert np.abs(low - full).max() < 0.15 * scale
    assert np.abs(low - full).mean() < 0.02 * scale
