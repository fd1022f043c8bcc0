"""Lightning-indexer scores and their top-k (DSA, DeepSeek-V3.2), without an [T, S, H_I] tensor.

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s] * scale)    for s <= pos(t), same segment
    indices[t] = the K = min(topk, S) keys of largest I[t, :]

Output order: every query's K slots are sorted by descending score; equal scores keep the LOWER
key index first (the order of `jax.lax.top_k`, which the dense model path uses, so both select
the same set); slots a query cannot fill (it sees fewer than K keys) come last, as index -1
with score -inf.

- `index_scores`: the formula above (unmasked), the one written copy: the references and
  `dsjax.model.indexer.index_scores_at` call it; the Pallas tiles spell it as 2-D dots per head.
- `indexer_topk_reference`: pure JAX; scores one query chunk at a time ([B, chunk, S], heads
  reduced in the chunk) and keeps its `jax.lax.top_k`, so memory is O(T K + chunk S).
- the Pallas kernels score a [block_t, block_s] tile at a time (one head at a time, so nothing
  larger than the tile exists), sort it with a bitonic network on (score, index) pairs and merge
  its best K into a running, sorted top-K (the classic merge of two sorted lists: keep the better
  of a[i] and b[K-1-i], then a bitonic merge). Key blocks wholly in a query block's causal
  future are skipped, and so is the sort of any tile with no score above the running K-th best.
  GPU style (Triton): grid (batch, query block); each program loops over its visible key blocks
  with the running top-K in registers (scores computed `key_chunk` keys per matmul); the
  network's partner exchanges are reshapes and masked reductions (Triton has no rolls), unrolled.
  TPU style (Mosaic): grid (batch, query block, key block), key axis sequential, the running
  top-K in the output block; partner exchanges are `pltpu.roll`s, stages in loops.
  Both lower for their platform (tests/test_kernel_lowering.py); neither has run on hardware.
- Block sizes: powers of two; block_s is raised to >= K, K padded to a power of two inside the
  kernel (to >= 128 compiled for a TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsjax.kernels import _backend as be
from dsjax.kernels.chunking import map_query_chunks

_SENTINEL = jnp.iinfo(jnp.int32).max


def _prepare(q, k, w, segment_ids, kv_segment_ids, q_offset, topk, scale):
    batch, length, _, dim = q.shape
    keys = k.shape[1]
    segment_ids, kv_segment_ids, q_pos = be.visibility_inputs(segment_ids, kv_segment_ids, q_offset, batch, length,
                                                              keys)
    scale = dim ** -0.5 if scale is None else float(scale)
    return segment_ids, kv_segment_ids, q_pos, min(int(topk), keys), scale


def index_scores(q, keys, w, scale):
    """The index score formula, sum_h w[.., h] * ReLU(q[.., h] . keys[.., s] * scale), unmasked.

    q [..., H, d], keys [..., S, d], w [..., H] -> [..., S] float32 (computed in float32); the
    leading dims are batch dims, equal in all three. One query's own keys (gathered rows) call it
    directly; keys shared by many queries go through `jax.vmap` over the query axis.
    """
    logits = jnp.einsum("...hd,...sd->...sh", q.astype(jnp.float32), keys.astype(jnp.float32))
    return jnp.einsum("...sh,...h->...s", jax.nn.relu(logits * scale), w.astype(jnp.float32))


def _map_score_chunks(reduce, q, k, w, segment_ids, scale, kv_segment_ids, q_offset, query_chunk):
    """reduce(masked scores [B, c, S] float32) over query chunks, re-joined along T.

    Heads are reduced per chunk, so at most [B, c, S, H] exists (c: ~64 MiB by default); with a
    top-k `reduce` nothing of size [T, S] is kept either.
    """
    segment_ids, kv_segment_ids, q_pos, _, scale = _prepare(q, k, w, segment_ids, kv_segment_ids, q_offset, 1, scale)
    batch, length, heads, _ = q.shape
    keys = k.shape[1]
    k_pos = jnp.arange(keys, dtype=jnp.int32)
    # queries of a chunk (axis 1) against the shared keys of their batch row
    shared_keys = jax.vmap(index_scores, in_axes=(1, None, 1, None), out_axes=1)

    def chunk_scores(qc, wc, pc, sc):  # [B, c, H, d], [B, c, H], [B, c], [B, c]
        scores = shared_keys(qc, k, wc, scale)
        visible = be.visibility(pc, sc, k_pos[None], kv_segment_ids)
        return reduce(jnp.where(visible, scores, -jnp.inf))

    if query_chunk is None:  # keep the per-chunk [B, c, S, H] tensor near 64 MiB
        query_chunk = max(1, min(length, (64 << 20) // max(1, 4 * batch * heads * keys)))
    return map_query_chunks(chunk_scores, (q, w, q_pos, segment_ids), (0, 0, 0, 0), query_chunk)


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
#
# A stage compare-exchanges every position p with its partner p ^ stride. How the partner is
# fetched depends on the kernel style:
# - "pairs" (GPU style; Triton has neither rolls nor slices of register tensors): view the row
#   as [n / (2 stride), 2, stride] and read the other member of each pair with a masked sum over
#   the size-2 axis (as Triton's own tl.sort does). Shapes depend on the stride, so the network
#   is unrolled in Python.
# - "roll" (TPU style): two lane rotations (`pltpu.roll`) and a select. The stride may be traced,
#   so the stages run in fori_loops (a small program).
# ---------------------------------------------------------------------------------------------

def _better(va, ia, vb, ib):
    """True where (va, ia) must come before (vb, ib) in the output order."""
    return (va > vb) | ((va == vb) & (ia < ib))


def _partner(x, stride, style):
    """x at position p ^ stride along the last axis (stride a power of two)."""
    n = x.shape[-1]
    if style == "roll":
        from jax.experimental.pallas import tpu as pltpu

        axis = x.ndim - 1
        upper = (jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) & stride) != 0
        return jnp.where(upper, pltpu.roll(x, stride, axis), pltpu.roll(x, n - stride, axis))
    pairs = x.reshape(*x.shape[:-1], n // (2 * stride), 2, stride)
    half = jax.lax.broadcasted_iota(jnp.int32, pairs.shape, pairs.ndim - 2)
    zero = jnp.zeros((), x.dtype)  # a select, not a product: -inf * 0 would be nan
    first = jnp.sum(jnp.where(half == 0, pairs, zero), axis=-2, keepdims=True)
    second = jnp.sum(jnp.where(half == 1, pairs, zero), axis=-2, keepdims=True)
    return jnp.where(half == 0, second, first).reshape(x.shape)


def _stage(v, i, size, stride, style, ascending):
    """One network stage: positions p and p ^ stride exchange so that the pair is ordered
    descending when bit `size` of p is clear, ascending when it is set (size >= n: all one
    way); `ascending` reverses every direction, hence the final order."""
    pos = jax.lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1)
    upper = (pos & stride) != 0
    descending = ((pos & size) == 0) != ascending
    pv, pi = _partner(v, stride, style), _partner(i, stride, style)
    keep = jnp.where(upper, _better(pv, pi, v, i), _better(v, i, pv, pi)) == descending
    return jnp.where(keep, v, pv), jnp.where(keep, i, pi)


def _run_stages(v, i, stages, style, ascending):
    """Apply the stages [(size, stride), ...] (Python ints) in order, unrolled."""
    for size, stride in stages:
        v, i = _stage(v, i, size, stride, style, ascending)
    return v, i


def _sort_stages(n):
    return [(1 << level, 1 << (level - m - 1)) for level in range(1, n.bit_length()) for m in range(level)]


def _merge_stages(n):
    return [(n, n >> (m + 1)) for m in range(n.bit_length() - 1)]


def bitonic_sort(v, i, *, ascending=False, style="pairs"):
    """Sort each row of v ([R, n], n a power of two) descending (ties: lower i first), or in the
    exact reverse of that order with `ascending`; i follows."""
    if style == "roll":  # traced stage parameters: a two-level loop keeps the program small
        log_n = v.shape[-1].bit_length() - 1

        def level(l, carry):  # merges sorted runs of 2^(l-1) into bitonic-sorted runs of 2^l
            size = jnp.left_shift(1, l)
            step = lambda m, c: _stage(*c, size, jnp.right_shift(size, m + 1), style, ascending)
            return jax.lax.fori_loop(0, l, step, carry)

        return jax.lax.fori_loop(1, log_n + 1, level, (v, i))
    return _run_stages(v, i, _sort_stages(v.shape[-1]), style, ascending)


def _flip(x, style):
    """x reversed along the last axis: position p ^ (n - 1), one partner swap per bit."""
    stride = 1
    while stride < x.shape[-1]:
        x = _partner(x, stride, style)
        stride *= 2
    return x


def merge_sorted(va, ia, vb, ib, *, b_ascending=False, style="pairs"):
    """The n best of two sorted lists ([R, n] each; a descending, b descending or, with
    `b_ascending`, in reverse order), sorted descending: keep the better of a[i] and
    b[n - 1 - i] (a bitonic sequence holding the n best), then a bitonic merge."""
    if not b_ascending:
        vb, ib = _flip(vb, style), _flip(ib, style)
    keep_a = _better(va, ia, vb, ib)
    v, i = jnp.where(keep_a, va, vb), jnp.where(keep_a, ia, ib)
    n = va.shape[-1]
    if style == "roll":
        step = lambda m, c: _stage(*c, n, jnp.right_shift(n // 2, m), style, False)
        return jax.lax.fori_loop(0, n.bit_length() - 1, step, (v, i))
    return _run_stages(v, i, _merge_stages(n), style, False)


def _merge_tile(vals, idxs, scores, k_pos, style):
    """Running sorted top-kp (vals, idxs [bt, kp]) merged with a tile's scores [bt, n >= kp]."""
    kp, n = vals.shape[-1], scores.shape[-1]
    v, i = bitonic_sort(scores, k_pos, ascending=True, style=style)
    if n > kp:  # the tile's kp best are its last kp (ascending order)
        v, i = jnp.split(v, n // kp, axis=-1)[-1], jnp.split(i, n // kp, axis=-1)[-1]
    return merge_sorted(vals, idxs, v, i, b_ascending=True, style=style)


# ---------------------------------------------------------------------------------------------
# Pallas kernels.
#
# Operands (both styles): queries and head weights head-major, q [B, H, T, d] and w [B, H, T, 1],
# so that one head's [bt, d] queries and [bt, 1] weights are plain leading-axis loads; query
# positions / segments as [B, T, 1] columns, key segments as a [B, 1, S] row (TPU blocks need
# their last two dims tile-aligned or whole).
# GPU style (Triton): grid (batch, query block); each program loops over the key blocks its
# queries can see and keeps the running top-K in registers (Triton programs run in parallel,
# so state must not live across grid steps). TPU style (Mosaic): grid (batch, query block, key
# block) with the key axis sequential ("arbitrary"), the running top-K held in the output block.
# ---------------------------------------------------------------------------------------------


def _tile_scores(q_ref, w_ref, k_ref, kseg_ref, q_pos, q_seg, base, start, *, block_s, key_chunk, heads, scale,
                 num_keys):
    """Masked index scores [bt, block_s] float32 of keys start ... start + block_s (rows base ...
    of k_ref / kseg_ref), and their positions. Heads are accumulated one at a time (nothing of
    size [bt, H, block_s]); keys in chunks of key_chunk (the GPU dot's operand tile)."""
    block_t = q_pos.shape[0]

    # `index_scores` in a kernel's terms: its einsum is a batched dot (Triton lowers 2-D dots only)
    # over all heads at once, a [bt, key_chunk, H] tile; here heads accumulate one 2-D dot at a time.
    def chunk_scores(j):  # [bt, key_chunk]
        k = k_ref[pl.ds(base + j * key_chunk, key_chunk), :]

        def head(h, acc):
            logits = jax.lax.dot_general(q_ref[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            return acc + w_ref[h] * jnp.maximum(logits * scale, 0.0)  # ReLU (jax.nn.relu is a custom_jvp)

        return jax.lax.fori_loop(0, heads, head, jnp.zeros((block_t, key_chunk), jnp.float32))

    chunks = block_s // key_chunk
    col = jax.lax.broadcasted_iota(jnp.int32, (block_t, block_s), 1)
    if chunks == 1:
        scores = chunk_scores(0)
    else:  # place each chunk by broadcast + select (Triton cannot update a slice of a value)
        def insert(j, scores):
            tiled = jnp.broadcast_to(chunk_scores(j)[:, None, :], (block_t, chunks, key_chunk))
            return jnp.where(jax.lax.div(col, key_chunk) == j, tiled.reshape(block_t, block_s), scores)

        scores = jax.lax.fori_loop(0, chunks, insert, jnp.zeros((block_t, block_s), jnp.float32))
    k_pos = start + col
    visible = (k_pos <= q_pos) & (kseg_ref[:, pl.ds(base, block_s)] == q_seg) & (k_pos < num_keys)
    return jnp.where(visible, scores, -jnp.inf), k_pos


def _improves(scores, vals):
    """Whether any score beats its query's K-th best so far (vals sorted: the row minimum)."""
    kth_best = jnp.min(vals, axis=1, keepdims=True)
    return jnp.max(jnp.where(scores > kth_best, 1.0, 0.0)) > 0  # float: see be.last_position


def _topk_kernel_gpu(qpos_ref, qseg_ref, w_ref, q_ref, kseg_ref, k_ref, val_ref, idx_ref, *, block_s, key_blocks,
                     **tile):
    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    block_t, kp = val_ref.shape
    # blocks past the last query position are in every query's future (padded queries: -1)
    blocks = jnp.minimum(key_blocks, jax.lax.div(be.last_position(q_pos) + block_s, block_s))

    def body(s, carry):
        start = s * block_s
        scores, k_pos = _tile_scores(q_ref, w_ref, k_ref, kseg_ref, q_pos, q_seg, start, start, block_s=block_s,
                                     **tile)
        return jax.lax.cond(_improves(scores, carry[0]), lambda: _merge_tile(*carry, scores, k_pos, "pairs"),
                            lambda: carry)

    init = (jnp.full((block_t, kp), -jnp.inf, jnp.float32), jnp.full((block_t, kp), _SENTINEL, jnp.int32))
    vals, idxs = jax.lax.fori_loop(0, blocks, body, init)
    val_ref[...] = vals
    idx_ref[...] = idxs


def _topk_kernel_tpu(qpos_ref, qseg_ref, w_ref, q_ref, kseg_ref, k_ref, val_ref, idx_ref, *, block_s, **tile):
    s_block = pl.program_id(2)

    @pl.when(s_block == 0)
    def _init():
        val_ref[...] = jnp.full(val_ref.shape, -jnp.inf, jnp.float32)
        idx_ref[...] = jnp.full(idx_ref.shape, _SENTINEL, jnp.int32)

    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    start = s_block * block_s

    @pl.when(start <= be.last_position(q_pos))  # else the whole key block is in every query's future
    def _step():
        scores, k_pos = _tile_scores(q_ref, w_ref, k_ref, kseg_ref, q_pos, q_seg, 0, start, block_s=block_s, **tile)

        @pl.when(_improves(scores, val_ref[...]))  # else the sort can be skipped
        def _merge():
            v, i = _merge_tile(val_ref[...], idx_ref[...], scores, k_pos, "roll")
            val_ref[...] = v
            idx_ref[...] = i


def _block_sizes(backend, length, keys, kp, block_t, block_s, key_chunk):
    """Kernel block sizes (powers of two) for the backend, from the caller's or default values."""
    gpu = backend.kind == "gpu"
    if backend.compiled_for_gpu:  # tl.dot needs >= 16 rows; [16, 128] tiles keep registers sane
        block_t, block_s = block_t or 16, block_s or 128
    else:
        block_t, block_s = block_t or 32, block_s or 512
    block_t = min(be.next_pow2(block_t), be.next_pow2(length))
    block_s = max(min(be.next_pow2(block_s), be.next_pow2(keys)), kp)
    if backend.compiled_for_gpu:
        block_t, block_s = max(block_t, 16), max(block_s, 16)
    if backend.compiled_for_tpu:  # (8, 128) tiles: sublane-aligned queries, lane-aligned keys
        block_t, block_s = max(block_t, 8), max(block_s, 128)
    if not gpu:
        key_chunk = block_s
    key_chunk = min(be.next_pow2(key_chunk or 128), block_s)
    if backend.compiled_for_gpu:
        key_chunk = max(key_chunk, 16)
    return block_t, block_s, key_chunk


def _indexer_topk_pallas(q, k, w, q_seg, k_seg, q_pos, kk, scale, backend, block_t, block_s, key_chunk):
    batch, length, heads, dim = q.shape
    keys = k.shape[1]
    kp = be.next_pow2(kk)
    if backend.compiled_for_tpu:  # whole lane tiles: the tile's top-kp slice stays 128-aligned
        kp = max(kp, 128)
    block_t, block_s, key_chunk = _block_sizes(backend, length, keys, kp, block_t, block_s, key_chunk)
    gpu = backend.kind == "gpu"
    t_pad, s_pad = be.round_up(length, block_t), be.round_up(keys, block_s)
    d_pad = be.next_pow2(max(dim, 16 if backend.compiled_for_gpu else 1)) if gpu else dim  # Triton: 2^n tiles
    q = jnp.moveaxis(be.pad_axis(be.pad_axis(q, 1, t_pad), 3, d_pad), 2, 1)  # [B, H, T, d]
    w = jnp.moveaxis(be.pad_axis(w.astype(jnp.float32), 1, t_pad), 2, 1)[..., None]  # [B, H, T, 1]
    q_pos = be.pad_axis(q_pos, 1, t_pad, -1)[..., None]
    q_seg = be.pad_axis(q_seg, 1, t_pad)[..., None]
    k = be.pad_axis(be.pad_axis(k, 1, s_pad), 2, d_pad)
    k_seg = be.pad_axis(k_seg, 1, s_pad)[:, None, :]
    tile = dict(key_chunk=key_chunk, heads=heads, scale=scale, num_keys=keys)
    out_shape = [jax.ShapeDtypeStruct((batch, t_pad, kp), jnp.float32),
                 jax.ShapeDtypeStruct((batch, t_pad, kp), jnp.int32)]
    if gpu:
        kernel = functools.partial(_topk_kernel_gpu, block_s=block_s, key_blocks=s_pad // block_s, **tile)
        grid = (batch, t_pad // block_t)
        column = pl.BlockSpec((None, block_t, 1), lambda b, i: (b, i, 0))
        in_specs = [column, column,
                    pl.BlockSpec((None, heads, block_t, 1), lambda b, i: (b, 0, i, 0)),
                    pl.BlockSpec((None, heads, block_t, d_pad), lambda b, i: (b, 0, i, 0)),
                    pl.BlockSpec((None, 1, s_pad), lambda b, i: (b, 0, 0)),
                    pl.BlockSpec((None, s_pad, d_pad), lambda b, i: (b, 0, 0))]
        out_spec = pl.BlockSpec((None, block_t, kp), lambda b, i: (b, i, 0))
        compiler_params = backend.gpu_params()
    else:
        from jax.experimental.pallas import tpu as pltpu

        kernel = functools.partial(_topk_kernel_tpu, block_s=block_s, **tile)
        grid = (batch, t_pad // block_t, s_pad // block_s)
        column = pl.BlockSpec((None, block_t, 1), lambda b, i, s: (b, i, 0))
        in_specs = [column, column,
                    pl.BlockSpec((None, heads, block_t, 1), lambda b, i, s: (b, 0, i, 0)),
                    pl.BlockSpec((None, heads, block_t, dim), lambda b, i, s: (b, 0, i, 0)),
                    pl.BlockSpec((None, 1, block_s), lambda b, i, s: (b, 0, s)),
                    pl.BlockSpec((None, block_s, dim), lambda b, i, s: (b, s, 0))]
        out_spec = pl.BlockSpec((None, block_t, kp), lambda b, i, s: (b, i, 0))
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    values, indices = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=backend.interpret,
        name="indexer_topk",
    )(q_pos, q_seg, w, q, k_seg, k)
    values, indices = values[:, :length, :kk], indices[:, :length, :kk]
    indices = jnp.where(values == -jnp.inf, -1, indices)
    return indices, values


def indexer_topk(q_idx, k_idx, w, segment_ids=None, *, topk: int, scale: float | None = None,
                 kv_segment_ids=None, q_offset=None, return_scores: bool = False, impl: str = "xla",
                 block_t: int | None = None, block_s: int | None = None, key_chunk: int | None = None,
                 interpret=None):
    """Top-k keys of the lightning indexer for every query.

    Args:
      q_idx: [B, T, H_I, d] indexer queries (RoPE applied); k_idx: [B, S, d] indexer keys.
      w: [B, T, H_I] head weights (float32, already times H_I^-0.5).
      segment_ids: [B, T] int (None: one segment). kv_segment_ids: [B, S] (default: segment_ids,
        which needs S == T). q_offset: scalar or [B] absolute position of query 0 (decode);
        query t sees keys s <= q_offset + t of its segment.
      topk: k; K = min(topk, S) slots are returned. scale: default d^-0.5.
      impl: "xla" | "pallas" | "pallas_gpu" | "pallas_tpu" | "auto" (see `dsjax.kernels._backend`).
      block_t / block_s: query / key block of the Pallas kernel (powers of two; block_s is raised
        to >= K). Defaults: 16 / 128 compiled for a GPU, 32 / 512 otherwise. key_chunk (GPU style):
        keys per score matmul inside a block (default 128).

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
    indices, values = _indexer_topk_pallas(q_idx, k_idx, w, q_seg, k_seg, q_pos, kk, scale, backend, block_t,
                                           block_s, key_chunk)
    return (indices, values) if return_scores else indices
