"""DSA kernels (dsjax/kernels): each Pallas kernel against its pure-JAX reference, and each
reference against a naive dense masked computation. Pallas kernels run in interpret mode on CPU:
GPU style with interpret=True, TPU style (sparse MLA) with pltpu.InterpretParams on tiny shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.kernels import _backend as be
from dsjax.kernels import (attention_lse, attention_target, attention_target_at, indexer_topk,
                           indexer_topk_reference, sparse_mla, sparse_mla_reference)
from dsjax.kernels.indexer_topk import bitonic_sort, index_scores_reference, merge_sorted


def _rng(seed):
    return np.random.default_rng(seed)


def _segments(batch, length, cuts):
    """Packed documents: segment id increases at each cut (same cuts for every row)."""
    seg = np.ones((batch, length), np.int32)
    for c in cuts:
        seg[:, c:] += 1
    return jnp.asarray(seg)


def _call(fn, *args, **kwargs):
    """fn(*args, **kwargs) under jit (keyword arguments are baked in): eager dispatch of the
    wrappers' small ops would dominate the test time."""
    return jax.jit(functools.partial(fn, **kwargs))(*args)


def _dense_mask(segment_ids, q_pos=None, kv_segment_ids=None):
    """Causal + same-segment mask [B, T, S] (numpy)."""
    segment_ids = np.asarray(segment_ids)
    batch, length = segment_ids.shape
    kv_seg = segment_ids if kv_segment_ids is None else np.asarray(kv_segment_ids)
    q_pos = np.broadcast_to(np.arange(length), (batch, length)) if q_pos is None else np.asarray(q_pos)
    k_pos = np.arange(kv_seg.shape[1])
    return jnp.asarray((k_pos[None, None, :] <= q_pos[:, :, None]) & (kv_seg[:, None, :] == segment_ids[:, :, None]))


def _naive_index_scores(q, k, w, mask, scale):
    """I[t, s] = sum_h w ReLU(q.k scale) in float64 numpy, -inf where masked."""
    q, k, w = (np.asarray(x, np.float64) for x in (q, k, w))
    logits = np.maximum(np.einsum("bthd,bsd->bths", q, k) * scale, 0.0)
    return np.where(np.asarray(mask), np.einsum("bths,bth->bts", logits, w), -np.inf)


def _brute_topk(scores, k):
    """Top-k per row by (score desc, index asc) with plain Python sorting; -1 for -inf slots."""
    batch, length, keys = scores.shape
    out = np.full((batch, length, k), -1, np.int64)
    for b in range(batch):
        for t in range(length):
            order = sorted(range(keys), key=lambda s: (-scores[b, t, s], s))[:k]
            picked = [s for s in order if scores[b, t, s] > -np.inf]
            out[b, t, :len(picked)] = picked
    return out


def _integer_inputs(seed, batch, length, heads, dim, keys=None):
    """Small-integer q, k and power-of-two weights: with dim a power of 4 (scale = dim^-0.5 exact)
    the scores are exact in float32, and ties are frequent."""
    rng = _rng(seed)
    keys = length if keys is None else keys
    q = rng.integers(-2, 3, (batch, length, heads, dim)).astype(np.float32)
    k = rng.integers(-2, 3, (batch, keys, dim)).astype(np.float32)
    w = (2.0 ** rng.integers(-2, 2, (batch, length, heads))) * rng.choice([1.0, 1.0, 1.0, -1.0], (batch, length, heads))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(w, jnp.float32)


def _random_inputs(seed, batch, length, heads, dim):
    rng = _rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((batch, length, heads)) * heads ** -0.5, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Backend choice.
# ---------------------------------------------------------------------------------------------


def test_backend_resolution_on_cpu():
    from jax.experimental.pallas import tpu as pltpu

    assert jax.default_backend() == "cpu"
    assert be.resolve("xla") == be.Backend("xla")
    assert be.resolve("auto") == be.Backend("xla")
    assert be.resolve("pallas") == be.Backend("gpu", True)
    assert be.resolve("pallas_gpu") == be.Backend("gpu", True)
    tpu = be.resolve("pallas_tpu")
    assert tpu.kind == "tpu" and isinstance(tpu.interpret, pltpu.InterpretParams)
    assert not be.resolve("pallas").compiled_for_gpu and not tpu.compiled_for_tpu
    assert be.resolve("pallas").gpu_params() is None  # interpreted: no Triton params
    assert be.Backend("gpu", False).compiled_for_gpu and be.Backend("tpu", False).compiled_for_tpu
    assert be.pow2_parts(576) == [512, 64] and be.pow2_parts(24, 16) == [32]
    with pytest.raises(ValueError):
        be.resolve("triton")


@pytest.mark.parametrize("style", ["pairs", "roll"])  # GPU (Triton) and TPU (pltpu.roll) partner fetch
def test_bitonic_network_sorts_and_merges_with_index_tie_break(style):
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.integers(0, 4, (5, 32)).astype(np.float32))  # many ties
    v = v.at[:, :3].set(-jnp.inf)  # empty slots score -inf
    i = jnp.asarray(rng.permutation(32 * 5).reshape(5, 32).astype(np.int32))
    sv, si = _call(bitonic_sort, v, i, style=style)
    order = np.lexsort((np.asarray(i), -np.asarray(v)), axis=-1)
    np.testing.assert_array_equal(si, np.take_along_axis(np.asarray(i), order, -1))
    np.testing.assert_array_equal(sv, np.take_along_axis(np.asarray(v), order, -1))
    av, ai = _call(bitonic_sort, v, i, ascending=True, style=style)  # the exact reverse order
    np.testing.assert_array_equal(ai, np.asarray(si)[:, ::-1])
    v2, i2 = _call(bitonic_sort, v[:, ::-1] + 0.5, i + 1000, style=style)
    all_v, all_i = np.concatenate([sv, v2], -1), np.concatenate([si, i2], -1)
    order = np.lexsort((all_i, -all_v), axis=-1)[:, :32]
    mv, mi = _call(merge_sorted, sv, si, v2, i2, style=style)
    np.testing.assert_array_equal(mi, np.take_along_axis(all_i, order, -1))
    mv, mi = _call(merge_sorted, sv, si, v2[:, ::-1], i2[:, ::-1], b_ascending=True, style=style)
    np.testing.assert_array_equal(mi, np.take_along_axis(all_i, order, -1))


# ---------------------------------------------------------------------------------------------
# Query chunking.
# ---------------------------------------------------------------------------------------------


def _chunk_fn(x, idx, table):
    """A per-query function with a pytree of [B, c, ...] outputs (a dict holding a tuple); -1
    indices (the fill) gather row 0 and are zeroed."""
    rows = jax.vmap(lambda t, i: t[jnp.maximum(i, 0)])(table, idx)  # [B, c, D]
    rows = jnp.where((idx >= 0)[..., None], rows, 0.0)
    return {"dot": jnp.sum(x * rows, -1), "pair": (jnp.tanh(x) * rows, idx * 2)}


@pytest.mark.parametrize("chunk, exact", [(4, False), (7, False), (29, False), (30, False), (64, False),
                                          (7, True), (64, True)])
def test_map_query_chunks_equals_unchunked(chunk, exact):
    """Ragged T = 30 (no multiple of 4, 7 or 29), pytree outputs: the chunked map equals one call
    on the whole arrays, values and gradients (under checkpoint); fn sees `chunk` queries per call
    (all T when one chunk covers T, unless `exact`)."""
    from dsjax.kernels.chunking import join_chunks, map_query_chunks, split_chunks

    rng = _rng(7)
    batch, length, dim = 2, 30, 5
    x = jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.float32)
    idx = jnp.asarray(rng.integers(-1, 12, (batch, length)), jnp.int32)
    table = jnp.asarray(rng.standard_normal((batch, 12, dim)), jnp.float32)
    seen = []

    def fn(xc, ic):
        seen.append(xc.shape[1])
        return _chunk_fn(xc, ic, table)

    want = _chunk_fn(x, idx, table)
    got = map_query_chunks(fn, (x, idx), (0.0, -1), chunk, exact=exact)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert seen == [chunk if exact or chunk < length else length]

    def loss(x, table, chunked):
        out = (map_query_chunks(lambda xc, ic: _chunk_fn(xc, ic, table), (x, idx), (0.0, -1), chunk,
                                checkpoint=True, exact=exact) if chunked else _chunk_fn(x, idx, table))
        return jnp.sum(out["dot"] ** 2) + jnp.sum(jnp.sin(out["pair"][0]))

    grads = jax.grad(loss, argnums=(0, 1))
    for g, w in zip(grads(x, table, True), grads(x, table, False)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)

    # the split itself: [n, B, c], the tail padded with the fill; join is its inverse
    split = split_chunks(idx, chunk, -1)
    n = -(-length // chunk)
    assert split.shape == (n, batch, chunk)
    flat = np.asarray(jnp.moveaxis(split, 0, 1).reshape(batch, n * chunk))
    assert (flat[:, length:] == -1).all()
    np.testing.assert_array_equal(np.asarray(join_chunks(split, length)), np.asarray(idx))


# ---------------------------------------------------------------------------------------------
# Indexer top-k.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["xla", "xla_chunked", "pallas", "pallas_key_chunks", "pallas_tpu"])
def test_indexer_topk_exact_ties_match_brute_force(impl):
    """Integer inputs: exact scores, many ties (ReLU zeros, repeated keys); packed documents,
    early queries with fewer than k keys (-1 slots), T not a multiple of the blocks, H = 3.
    pallas_key_chunks: the GPU kernel scores each key block in 4 matmul chunks."""
    batch, length, heads, dim, topk = 2, 75, 3, 16, 24
    q, k, w = _integer_inputs(1, batch, length, heads, dim)
    k = k.at[:, 40:50].set(k[:, 30:40])  # duplicated keys: equal scores at different indices
    seg = _segments(batch, length, [29])
    scale = dim ** -0.5
    if impl == "xla_chunked":  # the reference, 16 queries at a time (75 is not a multiple of 16)
        idx, vals = _call(indexer_topk_reference, q, k, w, seg, topk=topk, return_scores=True, query_chunk=16)
    else:
        chunks = dict(impl="pallas", key_chunk=8) if impl == "pallas_key_chunks" else dict(impl=impl)
        idx, vals = _call(indexer_topk, q, k, w, seg, topk=topk, return_scores=True, block_t=16, block_s=32,
                          **chunks)
    mask = _dense_mask(seg)
    naive = _naive_index_scores(q, k, w, mask, scale)
    expected = _brute_topk(naive, topk)
    np.testing.assert_array_equal(np.asarray(idx), expected)
    picked = np.take_along_axis(naive, np.maximum(expected, 0), -1)
    np.testing.assert_allclose(np.asarray(vals), np.where(expected >= 0, picked, -np.inf), rtol=1e-6)
    # -1 slots: exactly K - (number of visible keys) for early queries of each document
    visible = np.asarray(mask).sum(-1)
    np.testing.assert_array_equal((np.asarray(idx) < 0).sum(-1), np.maximum(topk - visible, 0))


def test_indexer_topk_reference_is_memory_lean():
    """The reference keeps each query chunk's top-k only: no [T, S] scores (the model's default path)."""
    batch, length, heads, dim, topk = 1, 16384, 4, 32, 256
    q = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.float32)
    k = jax.ShapeDtypeStruct((batch, length, dim), jnp.float32)
    w = jax.ShapeDtypeStruct((batch, length, heads), jnp.float32)
    top = jax.jit(lambda q, k, w: indexer_topk_reference(q, k, w, topk=topk))
    stats = top.lower(q, k, w).compile().memory_analysis()
    dense = batch * length * length * 4  # 1 GiB of float32 scores
    assert stats.temp_size_in_bytes < dense / 4, stats.temp_size_in_bytes


def test_indexer_topk_pallas_matches_reference_random_long():
    """Random floats at T = 2048 (the interpret-mode speed requirement), batch 2."""
    batch, length, heads, dim, topk = 2, 2048, 2, 16, 64
    q, k, w = _random_inputs(2, batch, length, heads, dim)
    seg = _segments(batch, length, [700, 1500])
    ref_idx, ref_val = _call(indexer_topk_reference, q, k, w, seg, topk=topk, return_scores=True)
    idx, val = jax.jit(lambda *a: indexer_topk(*a, topk=topk, return_scores=True, impl="pallas", block_t=64,
                                               block_s=128))(q, k, w, seg)
    idx, val, ref_idx, ref_val = (np.asarray(x) for x in (idx, val, ref_idx, ref_val))
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-5)
    assert (idx == ref_idx).mean() > 0.999
    # where the order differs, the kernel's keys carry the same (reference) scores: near-ties only
    scores = np.asarray(_call(index_scores_reference, q, k, w, seg))
    got = np.take_along_axis(scores, np.maximum(idx, 0), -1)
    np.testing.assert_allclose(np.where(idx >= 0, got, -np.inf), ref_val, rtol=1e-5, atol=1e-5)
    distinct = np.sort(np.where(idx >= 0, idx, -1 - np.arange(topk)), -1)
    assert (distinct[..., 1:] != distinct[..., :-1]).all()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_indexer_topk_decode_offset_and_kv_segments(impl):
    """Three new queries at positions 40..42 against a 64-row cache (left-padded row 1)."""
    batch, new, keys, heads, dim, topk = 2, 3, 64, 4, 16, 16
    q, k, w = _integer_inputs(3, batch, new, heads, dim, keys=keys)
    kv_seg = np.ones((batch, keys), np.int32)
    kv_seg[1, :10] = 0  # padding in row 1
    kv_seg = jnp.asarray(kv_seg)
    seg = jnp.ones((batch, new), jnp.int32)
    q_offset = jnp.array([40, 40])
    idx = _call(indexer_topk, q, k, w, seg, topk=topk, kv_segment_ids=kv_seg, q_offset=q_offset, impl=impl,
                       block_t=8, block_s=16)
    q_pos = q_offset[:, None] + jnp.arange(new)[None]
    naive = _naive_index_scores(q, k, w, _dense_mask(seg, q_pos, kv_seg), dim ** -0.5)
    np.testing.assert_array_equal(np.asarray(idx), _brute_topk(naive, topk))


def test_indexer_topk_k_larger_than_keys_and_tpu_style_interpret():
    batch, length, heads, dim = 1, 12, 2, 16
    q, k, w = _integer_inputs(4, batch, length, heads, dim)
    naive = _naive_index_scores(q, k, w, _dense_mask(jnp.ones((batch, length), jnp.int32)), dim ** -0.5)
    expected = _brute_topk(naive, length)
    for impl in ["xla", "pallas", "pallas_tpu"]:
        idx = _call(indexer_topk, q, k, w, topk=100, impl=impl, block_t=8, block_s=8)
        assert idx.shape == (batch, length, length)
        np.testing.assert_array_equal(np.asarray(idx), expected)


# ---------------------------------------------------------------------------------------------
# Sparse MLA.
# ---------------------------------------------------------------------------------------------


def _sparse_case(seed, batch, length, heads, dv, rope, topk, holes=0.15):
    """q, kv and causal random distinct indices with -1 slots: trailing (early queries) and
    random holes; query 0 of row 0 gets no slot at all."""
    rng = _rng(seed)
    dk = dv + rope
    q = rng.standard_normal((batch, length, heads, dk)).astype(np.float32)
    kv = rng.standard_normal((batch, length, dk)).astype(np.float32)
    causal = np.arange(length)[None, None, :] <= np.arange(length)[None, :, None]
    order = np.argsort(np.where(causal, -rng.random((batch, length, length)), np.inf), axis=-1)[..., :topk]
    idx = np.where(np.arange(topk)[None, None, :] <= np.arange(length)[None, :, None], order, -1)
    idx = np.where(rng.random(idx.shape) < holes, -1, idx)
    idx[0, 0] = -1
    return jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx, jnp.int32)


def _naive_sparse(q, kv, idx, scale, dv):
    selected = jnp.asarray(_selected_mask(idx, kv.shape[1]))
    s = jnp.einsum("bthd,bsd->bhts", q, kv) * scale
    s = jnp.where(selected[:, None], s, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(s, -1))  # rows with no key: 0
    out = jnp.einsum("bhts,bsd->bthd", p, kv[..., :dv])
    return out, jax.nn.logsumexp(s, -1).transpose(0, 2, 1)


def _value_and_grads(fn, q, kv, cot_out, cot_lse=None):
    def loss(q, kv):
        out, lse = fn(q, kv)
        total = jnp.sum(out * cot_out)
        if cot_lse is not None:
            total += jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * cot_lse)
        return total

    return jax.jit(lambda q, kv: fn(q, kv) + (jax.grad(loss, argnums=(0, 1))(q, kv),))(q, kv)


def test_sparse_mla_reference_matches_naive_dense():
    batch, length, heads, dv, rope, topk = 2, 33, 3, 16, 8, 10
    q, kv, idx = _sparse_case(5, batch, length, heads, dv, rope, topk)
    scale = 0.2
    cot = jnp.asarray(_rng(6).standard_normal((batch, length, heads, dv)), jnp.float32)
    ref = _value_and_grads(lambda q, kv: sparse_mla_reference(q, kv, idx, scale=scale, dv=dv, query_chunk=8),
                           q, kv, cot)
    naive = _value_and_grads(lambda q, kv: _naive_sparse(q, kv, idx, scale, dv), q, kv, cot)
    np.testing.assert_allclose(ref[0], naive[0], atol=2e-6)
    np.testing.assert_array_equal(ref[0][0, 0], 0.0)
    np.testing.assert_allclose(ref[1], naive[1], atol=2e-6)  # lse, -inf for the empty query
    for g_ref, g_naive in zip(ref[2], naive[2]):
        np.testing.assert_allclose(g_ref, g_naive, atol=5e-6)


def _sparse_pallas_vs_reference(impl, seed, shape, blocks, **kw):
    batch, length, heads, dv, rope, topk = shape
    q, kv, idx = _sparse_case(seed, batch, length, heads, dv, rope, topk)
    scale = 0.25
    rng = _rng(seed + 1)
    cot = jnp.asarray(rng.standard_normal((batch, length, heads, dv)), jnp.float32)
    cot_lse = jnp.asarray(rng.standard_normal((batch, length, heads)), jnp.float32)
    ref = _value_and_grads(lambda q, kv: sparse_mla(q, kv, idx, scale=scale, dv=dv, return_lse=True),
                           q, kv, cot, cot_lse)
    got = _value_and_grads(lambda q, kv: sparse_mla(q, kv, idx, scale=scale, dv=dv, impl=impl, return_lse=True,
                                                    block_t=blocks[0], block_k=blocks[1], **kw), q, kv, cot, cot_lse)
    np.testing.assert_allclose(got[0], ref[0], atol=2e-6)
    np.testing.assert_allclose(got[1], ref[1], atol=2e-6)
    for g_got, g_ref in zip(got[2], ref[2]):
        np.testing.assert_allclose(g_got, g_ref, atol=1e-5)


@pytest.mark.parametrize("shape,head_block", [((2, 45, 3, 16, 8, 20), None), ((1, 9, 2, 8, 0, 4), None),
                                              ((1, 13, 4, 16, 8, 6), 2)], ids=["mla", "no-rope", "head-blocks"])
def test_sparse_mla_gpu_style_kernel_fwd_bwd(shape, head_block):
    # T = 45 is not a multiple of block_t = 8; K = 20 not a multiple of block_k = 8; H = 3.
    # head-blocks: a grid axis over 2 blocks of 2 heads (dkv: both blocks add into the same rows).
    _sparse_pallas_vs_reference("pallas", 7, shape, (8, 8), head_block=head_block)


def test_sparse_mla_tpu_style_kernel_fwd_bwd_interpret():
    # pltpu.InterpretParams simulates every row DMA: tiny shapes. prefetch_limit forces two
    # scalar-prefetch chunks (queries 0-3 and 4-7).
    _sparse_pallas_vs_reference("pallas_tpu", 9, (1, 7, 2, 8, 8, 4), (2, 2), prefetch_limit=16)


def test_sparse_mla_reference_is_memory_lean():
    """Forward+backward of the reference never holds [T, K, Dk] gathered rows (nor [T, S])."""
    batch, length, heads, dv, rope, topk = 1, 4096, 4, 64, 16, 256
    dk = dv + rope
    q = jax.ShapeDtypeStruct((batch, length, heads, dk), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, length, dk), jnp.float32)
    idx = jax.ShapeDtypeStruct((batch, length, topk), jnp.int32)
    loss = lambda q, kv, idx: jnp.sum(sparse_mla(q, kv, idx, scale=0.1, dv=dv, query_chunk=256))
    stats = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, kv, idx).compile().memory_analysis()
    gathered = length * topk * dk * 4  # 335 MB
    assert stats.temp_size_in_bytes < gathered / 4, stats.temp_size_in_bytes


def test_sparse_mla_follows_indexer_like_dense_topk_masked_attention():
    """indexer_topk -> sparse_mla equals dense MQA-form attention under a [T, S] top-k mask built
    with `jax.lax.top_k` (packed documents, ties in the index scores)."""
    batch, length, heads, dim, topk, dv, rope = 2, 40, 3, 16, 12, 16, 8
    qi, ki, w = _integer_inputs(10, batch, length, 2, dim)
    seg = _segments(batch, length, [17])
    q, kv, _ = _sparse_case(11, batch, length, heads, dv, rope, 4)
    scale = 0.3
    idx = _call(indexer_topk, qi, ki, w, seg, topk=topk, impl="pallas", block_t=16, block_s=16)
    out = _call(sparse_mla, q, kv, idx, scale=scale, dv=dv, impl="pallas", block_t=8, block_k=8)
    scores = _call(index_scores_reference, qi, ki, w, seg)
    _, top = jax.jit(lambda s: jax.lax.top_k(s, topk))(scores)
    selected = _selected_mask(top, length) & np.asarray(_dense_mask(seg))  # -inf picks are dropped
    probs, _ = _np_head_probs(q, kv, selected, scale)
    dense = np.einsum("bhts,bsd->bthd", probs, np.asarray(kv, np.float64)[..., :dv])
    np.testing.assert_allclose(out, dense, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Attention targets.
# ---------------------------------------------------------------------------------------------


def _np_head_probs(q, kv, mask, scale):
    """Per-head masked softmax [B, H, T, S] (0 on rows with no key) and lse [B, T, H], float64."""
    s = np.einsum("bthd,bsd->bhts", np.asarray(q, np.float64), np.asarray(kv, np.float64)) * scale
    s = np.where(np.asarray(mask)[:, None], s, -np.inf)
    peak = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(peak), peak, 0.0))
    total = e.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, peak + np.log(total), -np.inf)[..., 0].transpose(0, 2, 1)
    return e / np.where(total > 0, total, 1.0), lse


def _selected_mask(idx, keys):
    idx = np.asarray(idx)
    batch, length, _ = idx.shape
    mask = np.zeros((batch, length, keys), bool)
    b_i, t_i, j_i = np.nonzero(idx >= 0)
    mask[b_i, t_i, idx[b_i, t_i, j_i]] = True
    return mask


@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas_head_blocks", "pallas_tpu"])
def test_attention_target_dense_matches_naive(impl):
    """pallas_head_blocks: GPU style, heads (3, zero-padded to 4) in 2 matmul blocks of 2."""
    batch, length, heads, dk = 2, 45, 3, 24
    rng = _rng(12)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dk)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((batch, length, dk)), jnp.float32)
    seg = _segments(batch, length, [20])
    scale = 0.3
    probs, lse = _np_head_probs(q, kv, _dense_mask(seg), scale)
    kw = dict(scale=scale, impl=impl, block_t=16, block_s=16)
    if impl == "pallas_head_blocks":
        kw.update(impl="pallas", head_block=2)
    p = _call(attention_target, q, kv, seg, **kw)
    np.testing.assert_allclose(p, probs.mean(1), atol=1e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(_call(attention_lse, q, kv, seg, **kw), lse, atol=2e-6)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(attention_target(q, kv, seg, **kw) ** 2)))(q)
    np.testing.assert_array_equal(grad, 0.0)  # a target: stop_gradient


@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas_head_blocks", "pallas_tpu"])
def test_attention_target_at_indices(impl):
    # pallas_head_blocks: GPU style, heads (3, padded to 4) in 2 programs whose shares are added.
    # The TPU style simulates one DMA per gathered row: a smaller case.
    batch, length, heads, dv, rope, topk = (1, 11, 3, 16, 8, 5) if impl == "pallas_tpu" else (2, 37, 3, 16, 8, 9)
    q, kv, idx = _sparse_case(13, batch, length, heads, dv, rope, topk)
    scale = 0.3
    idx_np = np.asarray(idx)
    take = lambda full: np.where(idx_np >= 0, np.take_along_axis(full, np.maximum(idx_np, 0), -1), 0.0)
    probs, lse = _np_head_probs(q, kv, _dense_mask(np.ones((batch, length), np.int32)), scale)
    kw = dict(scale=scale, impl=impl, block_t=8, block_k=4)
    if impl == "pallas_head_blocks":
        kw.update(impl="pallas", head_block=2)
    # dense probabilities read at the selected keys
    at = _call(attention_target_at, q, kv, idx, lse=jnp.asarray(lse, jnp.float32), normalize=False, **kw)
    np.testing.assert_allclose(at, take(probs.mean(1)), atol=1e-6)
    # default: the sparse attention's own head-averaged distribution over the slots
    own = _call(attention_target_at, q, kv, idx, **kw)
    sparse_probs, _ = _np_head_probs(q, kv, _selected_mask(idx, length), scale)
    np.testing.assert_allclose(own, take(sparse_probs.mean(1)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(own)[idx_np < 0], 0.0)
    np.testing.assert_allclose(np.asarray(own).sum(-1)[(idx_np >= 0).any(-1)], 1.0, atol=1e-5)
    # ... whose normaliser is sparse_mla's log-sum-exp
    _, sparse_lse = _call(sparse_mla, q, kv, idx, scale=scale, dv=dv, return_lse=True)
    again = _call(attention_target_at, q, kv, idx, lse=sparse_lse, normalize=False, **kw)
    np.testing.assert_allclose(again, own, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The real-hardware plans (block sizes and paddings), run interpreted.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def hardware_plans(monkeypatch):
    """Kernels pick the block sizes and paddings they use when compiled for a GPU / TPU (powers
    of two >= 16, one query per program, head blocks, 128-lane tiles, ...) but still run
    interpreted: those plans are checked numerically here (test_kernel_lowering only lowers them)."""
    monkeypatch.setattr(be.Backend, "compiled_for_gpu", property(lambda self: self.kind == "gpu"))
    monkeypatch.setattr(be.Backend, "compiled_for_tpu", property(lambda self: self.kind == "tpu"))
    monkeypatch.setattr(be.Backend, "gpu_params", lambda self, **kw: None)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_hardware_plans_match_references(hardware_plans, impl):
    batch, length, heads = 1, 29, 3
    # indexer: d = 12 (GPU: padded to 16), K = 12 (padded to 16; TPU: 128)
    q, k, w = _integer_inputs(14, batch, length, heads, 12)
    seg = _segments(batch, length, [19])
    idx = _call(indexer_topk, q, k, w, seg, topk=12, scale=0.25, impl=impl)
    naive = _naive_index_scores(q, k, w, _dense_mask(seg), 0.25)
    np.testing.assert_array_equal(np.asarray(idx), _brute_topk(naive, 12))
    # dense targets: Dk = 24 (GPU: one 32-wide part), H = 3 (GPU: padded to 4)
    rng = _rng(15)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, 24)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((batch, length, 24)), jnp.float32)
    probs, lse = _np_head_probs(q, kv, _dense_mask(seg), 0.3)
    np.testing.assert_allclose(_call(attention_target, q, kv, seg, scale=0.3, impl=impl), probs.mean(1), atol=1e-6)
    np.testing.assert_allclose(_call(attention_lse, q, kv, seg, scale=0.3, impl=impl), lse, atol=2e-6)
    # sparse: H = 3 (GPU: 16 in one head block), dv 16 + rope 8 (GPU: 16 + 16), K = 6 (GPU: 16)
    _sparse_pallas_vs_reference(impl, 16, (1, 13, 3, 16, 8, 6), (None, None))
    q, kv, idx = _sparse_case(17, 1, 13, 3, 16, 8, 6)
    for lse in [None, jnp.asarray(_np_head_probs(q, kv, _dense_mask(jnp.ones((1, 13), jnp.int32)), 0.3)[1],
                                  jnp.float32)]:
        kw = dict(scale=0.3, lse=lse, normalize=False)
        np.testing.assert_allclose(_call(attention_target_at, q, kv, idx, impl=impl, **kw),
                                   _call(attention_target_at, q, kv, idx, **kw), atol=1e-6)
