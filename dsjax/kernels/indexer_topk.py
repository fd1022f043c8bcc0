"""Lightning-indexer scores and their top-k (DSA, DeepSeek-V3.2), without an [T, S, H_I] tensor.

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s] * scale)    for s <= pos(t), same segment
    indices[t] = the K = min(topk, S) keys of largest I[t, :]

Output order: every query's K slots are sorted by descending score; equal scores keep the LOWER
key index first (the order of `jax.lax.top_k`, which the dense model path uses, so both select
the same set); slots a query cannot fill (it sees fewer than K keys) come last, as index -1
with score -inf.

- `indexer_topk_reference`: pure JAX; scores one query chunk at a time ([B, chunk, S], heads
  reduced in the chunk) and keeps its `jax.lax.top_k`, so memory is O(T K + chunk S).
- the Pallas kernel: grid (batch, query block, key block), key blocks innermost. Each step
  scores a [block_t, block_s] tile (heads reduced in-tile, so nothing larger than
  [block_t, H_I, block_s] exists), sorts it with a bitonic network on (score, index) pairs and
  merges it into a running, sorted top-K buffer held in the output block (the classic merge of
  two sorted lists: keep the better of a[i] and b[K-1-i], then a bitonic merge). Key blocks
  wholly in a query block's causal future are skipped, and so is the sort of any tile with no
  score above the running K-th best. The network's stages are compare-exchanges with the
  partner at distance 2^j, fetched with rolls (so the stages run in a loop: small programs);
  it runs in interpret mode (both styles); its Triton / Mosaic lowering is untested (no
  accelerator was available when it was written; Mosaic would want `pltpu.roll`).
- Block sizes: block_t queries (default 32) x block_s keys (default 512, raised to the next
  power of two >= K); K is padded to a power of two inside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsjax.kernels import _backend as be

_SENTINEL = jnp.iinfo(jnp.int32).max


def _prepare(q, k, w, segment_ids, kv_segment_ids, q_offset, topk, scale):
    batch, length, _, dim = q.shape
    keys = k.shape[1]
    segment_ids, kv_segment_ids, q_pos = be.visibility_inputs(segment_ids, kv_segment_ids, q_offset, batch, length,
                                                              keys)
    scale = dim ** -0.5 if scale is None else float(scale)
    return segment_ids, kv_segment_ids, q_pos, min(int(topk), keys), scale


def _map_score_chunks(reduce, q, k, w, segment_ids, scale, kv_segment_ids, q_offset, query_chunk):
    """reduce(masked scores [B, c, S] float32) over query chunks, re-joined along T.

    Heads are reduced per chunk, so at most [B, c, H, S] exists (c: ~64 MiB by default); with a
    top-k `reduce` nothing of size [T, S] is kept either.
    """
    segment_ids, kv_segment_ids, q_pos, _, scale = _prepare(q, k, w, segment_ids, kv_segment_ids, q_offset, 1, scale)
    batch, length, heads, _ = q.shape
    keys = k.shape[1]
    k32 = k.astype(jnp.float32)
    k_pos = jnp.arange(keys, dtype=jnp.int32)

    def chunk_scores(qc, wc, pc, sc):  # [B, c, H, d], [B, c, H], [B, c], [B, c]
        logits = jnp.einsum("bthd,bsd->bths", qc.astype(jnp.float32), k32)
        logits = jax.nn.relu(logits * scale)
        scores = jnp.einsum("bths,bth->bts", logits, wc.astype(jnp.float32))
        visible = be.visibility(pc, sc, k_pos[None], kv_segment_ids)
        return reduce(jnp.where(visible, scores, -jnp.inf))

    if query_chunk is None:  # keep the per-chunk [B, c, H, S] tensor near 64 MiB
        query_chunk = max(1, min(length, (64 << 20) // max(1, 4 * batch * heads * keys)))
    if query_chunk >= length:
        return chunk_scores(q, w, q_pos, segment_ids)
    chunks = be.cdiv(length, query_chunk)
    padded = chunks * query_chunk

    def split(x):  # [B, T, ...] -> [chunks, B, c, ...]
        x = be.pad_axis(x, 1, padded)
        return jnp.moveaxis(x.reshape(batch, chunks, query_chunk, *x.shape[2:]), 1, 0)

    out = jax.lax.map(lambda a: chunk_scores(*a), (split(q), split(w), split(q_pos), split(segment_ids)))
    join = lambda y: jnp.moveaxis(y, 0, 1).reshape(batch, padded, *y.shape[3:])[:, :length]  # noqa: E731
    return jax.tree.map(join, out)


def index_scores_reference(q, k, w, segment_ids=None, *, scale=None, kv_segment_ids=None, q_offset=None,
                           query_chunk: int | None = None):
    """The masked index scores [B, T, S] float32 (-inf where invisible), heads reduced per chunk."""
    return _map_score_chunks(lambda scores: scores, q, k, w, segment_ids, scale, kv_segment_ids, q_offset,
                             query_chunk)


def indexer_topk_reference(q, k, w, segment_ids=None, *, topk, scale=None, kv_segment_ids=None, q_offset=None,
                           return_scores=False, query_chunk: int | None = None):
    """Pure-JAX reference of `indexer_topk` (same arguments, same output convention).

    `jax.lax.top_k` runs per query chunk: memory O(T K + chunk S), never [T, S].
    """
    kk = min(int(topk), k.shape[1])

    def top(scores):
        values, indices = jax.lax.top_k(scores, kk)
        return values, jnp.where(values == -jnp.inf, -1, indices).astype(jnp.int32)

    values, indices = _map_score_chunks(top, q, k, w, segment_ids, scale, kv_segment_ids, q_offset, query_chunk)
    return (indices, values) if return_scores else indices


# ---------------------------------------------------------------------------------------------
# Bitonic sorting network on (value, index) rows, descending by value, ascending index on ties.
# ---------------------------------------------------------------------------------------------


def _better(va, ia, vb, ib):
    """True where (va, ia) must come before (vb, ib) in the output order."""
    return (va > vb) | ((va == vb) & (ia < ib))


def _partner(x, stride, upper):
    """x at position p ^ stride (stride a power of two, `upper` = bit `stride` of p is set)."""
    return jnp.where(upper, jnp.roll(x, stride, axis=-1), jnp.roll(x, -stride, axis=-1))


def _stage(v, i, size, stride):
    """One network stage: positions p and p ^ stride exchange so that the pair is ordered
    descending when bit `size` of p is clear, ascending when it is set (size >= n: all
    descending). `size` and `stride` may be traced scalars, so stages can run in a loop."""
    pos = jax.lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1)
    upper = (pos & stride) != 0
    descending = (pos & size) == 0
    pv, pi = _partner(v, stride, upper), _partner(i, stride, upper)
    self_better = _better(v, i, pv, pi)
    partner_better = _better(pv, pi, v, i)
    keep = jnp.where(upper, partner_better, self_better) == descending
    return jnp.where(keep, v, pv), jnp.where(keep, i, pi)


def bitonic_sort(v, i):
    """Sort each row of v ([R, n], n a power of two) descending; i follows (ties: lower i first)."""
    log_n = v.shape[-1].bit_length() - 1

    def level(l, carry):  # merges sorted runs of 2^(l-1) into bitonic-sorted runs of 2^l
        size = jnp.left_shift(1, l)

        def step(m, carry):
            return _stage(*carry, size, jnp.right_shift(size, m + 1))

        return jax.lax.fori_loop(0, l, step, carry)

    return jax.lax.fori_loop(1, log_n + 1, level, (v, i))


def merge_sorted(va, ia, vb, ib):
    """The n best of two sorted ([R, n] each, descending) lists, sorted descending."""
    n = va.shape[-1]
    vb, ib = jnp.flip(vb, axis=-1), jnp.flip(ib, axis=-1)
    keep_a = _better(va, ia, vb, ib)
    carry = (jnp.where(keep_a, va, vb), jnp.where(keep_a, ia, ib))  # bitonic, holds the n best
    log_n = n.bit_length() - 1
    return jax.lax.fori_loop(0, log_n, lambda m, c: _stage(*c, n, jnp.right_shift(n // 2, m)), carry)


# ---------------------------------------------------------------------------------------------
# Pallas kernel.
# ---------------------------------------------------------------------------------------------


def _topk_kernel(qpos_ref, qseg_ref, w_ref, q_ref, kseg_ref, k_ref, val_ref, idx_ref, *,
                 scale, num_keys, block_s, kp):
    s_block = pl.program_id(2)
    block_t, heads, dim = q_ref.shape

    @pl.when(s_block == 0)
    def _init():
        val_ref[...] = jnp.full(val_ref.shape, -jnp.inf, jnp.float32)
        idx_ref[...] = jnp.full(idx_ref.shape, _SENTINEL, jnp.int32)

    q_pos = qpos_ref[...]
    start = s_block * block_s

    @pl.when(start <= jnp.max(q_pos))  # else the whole key block is in every query's future
    def _step():
        q = q_ref[...].reshape(block_t * heads, dim)
        logits = jax.lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        logits = jax.nn.relu(logits.reshape(block_t, heads, block_s) * scale)
        scores = jnp.sum(logits * w_ref[...].astype(jnp.float32)[:, :, None], axis=1)  # [bt, bs]
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_t, block_s), 1)
        visible = ((k_pos <= q_pos[:, None]) & (kseg_ref[...][None, :] == qseg_ref[...][:, None])
                   & (k_pos < num_keys))
        scores = jnp.where(visible, scores, -jnp.inf)
        kth_best = val_ref[:, kp - 1]

        @pl.when(jnp.any(scores > kth_best[:, None]))
        def _merge():
            v, i = bitonic_sort(scores, k_pos)
            v, i = merge_sorted(val_ref[...], idx_ref[...], v[:, :kp], i[:, :kp])
            val_ref[...] = v
            idx_ref[...] = i


def _indexer_topk_pallas(q, k, w, q_seg, k_seg, q_pos, kk, scale, block_t, block_s, interpret):
    batch, length, heads, dim = q.shape
    keys = k.shape[1]
    kp = be.next_pow2(kk)
    block_s = max(be.next_pow2(block_s), kp)
    block_t = min(block_t, be.next_pow2(length))
    t_pad, s_pad = be.round_up(length, block_t), be.round_up(keys, block_s)
    q, w = be.pad_axis(q, 1, t_pad), be.pad_axis(w, 1, t_pad)
    q_pos, q_seg = be.pad_axis(q_pos, 1, t_pad, -1), be.pad_axis(q_seg, 1, t_pad)
    k, k_seg = be.pad_axis(k, 1, s_pad), be.pad_axis(k_seg, 1, s_pad)
    grid = (batch, t_pad // block_t, s_pad // block_s)
    kernel = functools.partial(_topk_kernel, scale=scale, num_keys=keys, block_s=block_s, kp=kp)
    out_spec = pl.BlockSpec((None, block_t, kp), lambda b, i, s: (b, i, 0))
    values, indices = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, block_t), lambda b, i, s: (b, i)),
            pl.BlockSpec((None, block_t), lambda b, i, s: (b, i)),
            pl.BlockSpec((None, block_t, heads), lambda b, i, s: (b, i, 0)),
            pl.BlockSpec((None, block_t, heads, dim), lambda b, i, s: (b, i, 0, 0)),
            pl.BlockSpec((None, block_s), lambda b, i, s: (b, s)),
            pl.BlockSpec((None, block_s, dim), lambda b, i, s: (b, s, 0)),
        ],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, t_pad, kp), jnp.float32),
                   jax.ShapeDtypeStruct((batch, t_pad, kp), jnp.int32)],
        interpret=interpret,
        name="indexer_topk",
    )(q_pos, q_seg, w, q, k_seg, k)
    values, indices = values[:, :length, :kk], indices[:, :length, :kk]
    indices = jnp.where(values == -jnp.inf, -1, indices)
    return indices, values


def indexer_topk(q_idx, k_idx, w, segment_ids=None, *, topk: int, scale: float | None = None,
                 kv_segment_ids=None, q_offset=None, return_scores: bool = False, impl: str = "xla",
                 block_t: int = 32, block_s: int = 512, interpret=None):
    """Top-k keys of the lightning indexer for every query.

    Args:
      q_idx: [B, T, H_I, d] indexer queries (RoPE applied); k_idx: [B, S, d] indexer keys.
      w: [B, T, H_I] head weights (float32, already times H_I^-0.5).
      segment_ids: [B, T] int (None: one segment). kv_segment_ids: [B, S] (default: segment_ids,
        which needs S == T). q_offset: scalar or [B] absolute position of query 0 (decode);
        query t sees keys s <= q_offset + t of its segment.
      topk: k; K = min(topk, S) slots are returned. scale: default d^-0.5.
      impl: "xla" | "pallas" | "pallas_gpu" | "pallas_tpu" | "auto" (see `dsjax.kernels._backend`).
      block_t / block_s: query / key block of the Pallas kernel (block_s is raised to the next
        power of two >= K).

    Returns indices [B, T, K] int32 (sorted by descending score, ties: lower index first, -1 for
    slots a query cannot fill, which come last), and with `return_scores` also their scores
    [B, T, K] float32 (-inf at -1 slots).
    """
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas:
        return indexer_topk_reference(q_idx, k_idx, w, segment_ids, topk=topk, scale=scale,
                                      kv_segment_ids=kv_segment_ids, q_offset=q_offset,
                                      return_scores=return_scores)
    q_seg, k_seg, q_pos, kk, scale = _prepare(q_idx, k_idx, w, segment_ids, kv_segment_ids, q_offset, topk, scale)
    indices, values = _indexer_topk_pallas(q_idx, k_idx, w, q_seg, k_seg, q_pos, kk, scale, block_t, block_s,
                                           backend.interpret)
    return (indices, values) if return_scores else indices
