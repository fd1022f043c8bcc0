"""Targets for training the DSA lightning indexer: the main attention's head-averaged probabilities.

MLA in MQA form (q [B, T, H, Dk], kv [B, S, Dk], as in `sparse_mla`), causal + same-segment:

    p[t, s] = (1 / H) sum_h softmax_s(q[t, h] . kv[s] * scale)

i.e. the probabilities summed over heads and L1-normalised per query (each head's softmax sums
to 1). No gradient flows through any of these functions (they are targets: outputs are wrapped
in `stop_gradient`).

- `attention_lse`: per-head log-sum-exp [B, T, H] of the dense masked scores (pass 1).
- `attention_target`: the dense p [B, T, S] float32 (dense warm-up stage). Pallas: pass 1 (lse,
  online over key blocks) then pass 2 writes p block by block; no [H, T, S] tensor exists.
  The XLA reference processes query chunks ([B, chunk, H, S] at a time).
- `attention_target_at`: p only at given `indices` [B, T, K] (sparse stage), O(T K). With
  `lse=None` the per-head softmax runs over the selected slots (the sparse attention's own
  distribution; equal to `sparse_mla(..., return_lse=True)`'s normaliser); pass `lse` from
  `attention_lse` to read the dense probabilities at the selected keys instead. `normalize`
  rescales each query's K values to sum to 1 (slots -1 give 0).

Pallas kernels, both styles: the dense ones are BlockSpec kernels (see "Pallas kernels (dense)"
below); `attention_target_at` gathers rows like `sparse_mla` (GPU style: vector-indexed kv refs,
one query per program when compiled; TPU style: scalar-prefetched indices, row DMAs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsjax.kernels import _backend as be
from dsjax.kernels.chunking import map_query_chunks
from dsjax.kernels.sparse_mla import _bdot, _gather_block, _gather_rows, _over_row_chunks, _used_chunks


def _prepare(q, kv, segment_ids, kv_segment_ids, q_offset):
    return be.visibility_inputs(segment_ids, kv_segment_ids, q_offset, q.shape[0], q.shape[1], kv.shape[1])


def _dense_chunk_scores(q, kv, pos, seg, kv_seg, scale):
    s = jnp.einsum("bthd,bsd->bths", q, kv, preferred_element_type=jnp.float32) * scale
    visible = be.visibility(pos, seg, jnp.arange(kv.shape[1], dtype=jnp.int32)[None], kv_seg)
    return jnp.where(visible[:, :, None, :], s, -jnp.inf)


def _safe_lse(s, axis):
    peak = jnp.max(s, axis=axis, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    total = jnp.sum(jnp.exp(s - peak), axis=axis, keepdims=True)
    lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return jnp.squeeze(lse, axis)


def _probs(s, lse):
    """exp(s - lse) with 0 wherever s or lse is -inf."""
    live = (s > -jnp.inf) & (lse > -jnp.inf)
    return jnp.where(live, jnp.exp(s - jnp.where(live, lse, 0.0)), 0.0)


def _default_chunk(batch, heads, keys, budget=64 << 20):
    return max(1, budget // max(1, 3 * 4 * batch * heads * keys))


# ---------------------------------------------------------------------------------------------
# References.
# ---------------------------------------------------------------------------------------------


def attention_lse_reference(q, kv, segment_ids=None, *, scale, kv_segment_ids=None, q_offset=None,
                            query_chunk=None):
    seg, kv_seg, pos = _prepare(q, kv, segment_ids, kv_segment_ids, q_offset)
    batch, _, heads, _ = q.shape
    chunk = query_chunk or _default_chunk(batch, heads, kv.shape[1])
    fn = lambda qc, pc, sc: _safe_lse(_dense_chunk_scores(qc, kv, pc, sc, kv_seg, scale), -1)
    return map_query_chunks(fn, (q, pos, seg), (0, -1, 0), chunk)


def attention_target_reference(q, kv, segment_ids=None, *, scale, kv_segment_ids=None, q_offset=None,
                               query_chunk=None):
    seg, kv_seg, pos = _prepare(q, kv, segment_ids, kv_segment_ids, q_offset)
    batch, _, heads, _ = q.shape
    chunk = query_chunk or _default_chunk(batch, heads, kv.shape[1])

    def fn(qc, pc, sc):
        s = _dense_chunk_scores(qc, kv, pc, sc, kv_seg, scale)
        return jnp.mean(_probs(s, _safe_lse(s, -1)[..., None]), axis=2)

    return map_query_chunks(fn, (q, pos, seg), (0, -1, 0), chunk)


def attention_target_at_reference(q, kv, indices, *, scale, lse=None, normalize=True, query_chunk=None):
    batch, length, heads, dk = q.shape
    k = indices.shape[-1]
    chunk = query_chunk or max(1, (64 << 20) // max(1, batch * k * (dk * kv.dtype.itemsize + 12 * heads)))
    lse_in = jnp.zeros((batch, length, heads), jnp.float32) if lse is None else lse.astype(jnp.float32)

    def fn(qc, ic, lc):
        rows, valid = _gather_rows(kv, ic)
        s = jnp.einsum("bthd,btkd->bthk", qc, rows, preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
        norm = _safe_lse(s, -1) if lse is None else lc
        return jnp.mean(_probs(s, norm[..., None]), axis=2)

    p = map_query_chunks(fn, (q, indices, lse_in), (0, -1, 0), chunk)
    return _normalized(p) if normalize else p


def _normalized(p):
    total = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


# ---------------------------------------------------------------------------------------------
# Pallas kernels (dense).
#
# Operands: query positions / segments as [B, T, 1] columns, key segments as a [B, 1, S] row,
# per-head statistics as [B, T, H, 1] (TPU blocks need their last two dims tile-aligned or
# whole; these layouts also broadcast without relayouts). GPU style: q and kv cut into
# power-of-two widths (Triton tiles; 576 = 512 + 64), heads zero-padded to a power of two and
# processed `head_block` at a time (the matmul has bt * head_block rows).
# Pass 1 (lse): GPU grid (batch, query block, head block), each program loops over the key blocks
# its queries see (Triton programs run in parallel: no state across grid steps); TPU grid
# (batch, query block, key block) with the key axis sequential and the running max / sum in the
# output blocks. Pass 2 (probabilities): grid (batch, query block, key block) in both styles,
# each program writing its own [bt, bs] tile.
# ---------------------------------------------------------------------------------------------


def _head_scores(q_refs, kvs, q_pos, q_seg, k_seg, start, h0, head_block, scale, num_keys):
    """Masked scaled scores [bt, hb, bs] float32 of heads h0 ... h0 + hb against key rows `kvs`
    (one [bs, w] value per width part) starting at key position `start`."""
    block_t, block_s = q_pos.shape[0], kvs[0].shape[0]
    s = None
    for q_ref, kv in zip(q_refs, kvs):
        q = q_ref[:, pl.ds(h0, head_block), :].reshape(block_t * head_block, q_ref.shape[-1])
        part = jax.lax.dot_general(q, kv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = part if s is None else s + part
    s = s.reshape(block_t, head_block, block_s) * scale
    k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_t, block_s), 1)
    visible = (k_pos <= q_pos) & (k_seg == q_seg) & (k_pos < num_keys)
    return jnp.where(visible[:, None, :], s, -jnp.inf)


def _online_lse_step(peak, total, s):
    """Running (max, sum of exp) [.., 1] updated with the scores s [.., bs]."""
    new_peak = jnp.maximum(peak, jnp.max(s, axis=-1, keepdims=True))
    safe = jnp.where(new_peak == -jnp.inf, 0.0, new_peak)
    return new_peak, total * jnp.exp(peak - safe) + jnp.sum(jnp.exp(s - safe), axis=-1, keepdims=True)


def _split_refs(refs, n_parts, n_mid):
    """(q part refs, the n_mid refs after them, kv part refs, the remaining refs)."""
    q_refs, rest = refs[:n_parts], refs[n_parts:]
    return q_refs, rest[:n_mid], rest[n_mid:n_mid + n_parts], rest[n_mid + n_parts:]


def _lse_kernel_gpu(qpos_ref, qseg_ref, *refs, n_parts, block_s, key_blocks, scale, num_keys):
    q_refs, (kseg_ref,), kv_refs, (m_ref, l_ref) = _split_refs(refs, n_parts, 1)
    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    head_block = m_ref.shape[1]
    blocks = jnp.minimum(key_blocks, jax.lax.div(be.last_position(q_pos) + block_s, block_s))

    def body(s_block, carry):
        start = s_block * block_s
        kvs = [kv_ref[pl.ds(start, block_s), :] for kv_ref in kv_refs]
        s = _head_scores(q_refs, kvs, q_pos, q_seg, kseg_ref[:, pl.ds(start, block_s)], start, 0, head_block, scale,
                         num_keys)
        return _online_lse_step(*carry, s)

    init = (jnp.full(m_ref.shape, -jnp.inf, jnp.float32), jnp.zeros(l_ref.shape, jnp.float32))
    peak, total = jax.lax.fori_loop(0, blocks, body, init)
    m_ref[...] = peak
    l_ref[...] = total


def _lse_kernel_tpu(qpos_ref, qseg_ref, q_ref, kseg_ref, kv_ref, m_ref, l_ref, *, scale, num_keys):
    s_block = pl.program_id(2)
    start = s_block * kv_ref.shape[0]

    @pl.when(s_block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    q_pos = qpos_ref[...]

    @pl.when(start <= be.last_position(q_pos))
    def _step():
        s = _head_scores([q_ref], [kv_ref[...]], q_pos, qseg_ref[...], kseg_ref[...], start, 0, m_ref.shape[1], scale,
                         num_keys)
        m_ref[...], l_ref[...] = _online_lse_step(m_ref[...], l_ref[...], s)


def _prob_kernel(qpos_ref, qseg_ref, *refs, n_parts, heads, head_block, scale, num_keys):
    q_refs, (lse_ref, kseg_ref), kv_refs, (p_ref,) = _split_refs(refs, n_parts, 2)
    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    block_t, block_s = p_ref.shape
    padded_heads = lse_ref.shape[1]
    start = pl.program_id(2) * block_s
    visible_block = start <= be.last_position(q_pos)

    @pl.when(visible_block)
    def _step():
        kvs = [kv_ref[...] for kv_ref in kv_refs]
        k_seg = kseg_ref[...]

        def chunk(c, acc):
            h0 = c * head_block
            s = _head_scores(q_refs, kvs, q_pos, q_seg, k_seg, start, h0, head_block, scale, num_keys)
            p = _probs(s, lse_ref[:, pl.ds(h0, head_block), :])
            if padded_heads > heads:  # zero-padded heads (GPU style) must not enter the mean
                head = h0 + jax.lax.broadcasted_iota(jnp.int32, (1, head_block, 1), 1)
                p = jnp.where(head < heads, p, 0.0)
            return acc + jnp.sum(p, axis=1)

        acc = jax.lax.fori_loop(0, padded_heads // head_block, chunk, jnp.zeros((block_t, block_s), jnp.float32))
        p_ref[...] = acc * (1.0 / heads)

    @pl.when(jnp.logical_not(visible_block))
    def _zero():
        p_ref[...] = jnp.zeros(p_ref.shape, jnp.float32)


def _dense_plan(backend, batch, length, heads, dk, keys, itemsize, block_t, block_s, head_block):
    """Block sizes, width parts and padded head count of the dense kernels."""
    gpu = backend.kind == "gpu"
    # compiled GPU: matmul rows bt * hb and keys bs of 64 (2-byte inputs) or 32: the two operand
    # tiles, [rows + bs, 576], then take ~150 KiB of shared memory (H100: ~228 KiB)
    rows = 64 if itemsize <= 2 else 32
    if backend.compiled_for_gpu:
        block_t, block_s = block_t or 16, block_s or rows
    elif backend.kind == "tpu":  # ~512-1024 matmul rows per step
        block_t, block_s = block_t or max(8, 512 // be.next_pow2(heads)), block_s or 512
    else:
        block_t, block_s = block_t or 32, block_s or 512
    block_t = min(be.next_pow2(block_t), be.next_pow2(length))
    block_s = min(be.next_pow2(block_s), be.next_pow2(keys))
    if backend.compiled_for_gpu:  # tl.dot needs >= 16 per dim
        block_t, block_s = max(block_t, 16), max(block_s, 16)
    if backend.compiled_for_tpu:  # (8, 128) tiles
        block_t, block_s = max(block_t, 8), max(block_s, 128)
    if gpu:
        widths = be.pow2_parts(dk, 16 if backend.compiled_for_gpu else 1)
        padded_heads = be.next_pow2(heads)
        head_block = head_block or (max(1, rows // block_t) if backend.compiled_for_gpu else padded_heads)
        head_block = min(be.next_pow2(head_block), padded_heads)
    else:
        widths, padded_heads, head_block = [dk], heads, heads
    return dict(block_t=block_t, block_s=block_s, widths=widths, padded_heads=padded_heads, head_block=head_block,
                t_pad=be.round_up(length, block_t), s_pad=be.round_up(keys, block_s))


def _dense_operands(q, kv, seg, kv_seg, pos, plan):
    """Padded operands: (q_pos, q_seg columns, q parts, kv_seg row, kv parts)."""
    t_pad, s_pad = plan["t_pad"], plan["s_pad"]
    q = be.pad_axis(be.pad_axis(q, 1, t_pad), 2, plan["padded_heads"])
    kv = be.pad_axis(kv, 1, s_pad)
    return (be.pad_axis(pos, 1, t_pad, -1)[..., None], be.pad_axis(seg, 1, t_pad)[..., None],
            be.split_last(q, plan["widths"]), be.pad_axis(kv_seg, 1, s_pad)[:, None, :],
            be.split_last(kv, plan["widths"]))


def _tpu_params(*semantics):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def _dense_lse(q, kv, seg, kv_seg, pos, scale, backend, plan):
    """Per-head log-sum-exp [B, T, H_padded, 1] (padded rows included)."""
    batch, heads, keys = q.shape[0], plan["padded_heads"], kv.shape[1]
    bt, bs, hb, t_pad, s_pad = (plan[k] for k in ("block_t", "block_s", "head_block", "t_pad", "s_pad"))
    q_pos, q_seg, q_parts, k_seg, kv_parts = _dense_operands(q, kv, seg, kv_seg, pos, plan)
    stat_shape = jax.ShapeDtypeStruct((batch, t_pad, heads, 1), jnp.float32)
    if backend.kind == "gpu":
        n = len(q_parts)
        kernel = functools.partial(_lse_kernel_gpu, n_parts=n, block_s=bs, key_blocks=s_pad // bs, scale=scale,
                                   num_keys=keys)
        column = pl.BlockSpec((None, bt, 1), lambda b, i, h: (b, i, 0))
        stat = pl.BlockSpec((None, bt, hb, 1), lambda b, i, h: (b, i, h, 0))
        in_specs = ([column, column] + [pl.BlockSpec((None, bt, hb, x.shape[-1]), lambda b, i, h: (b, i, h, 0))
                                         for x in q_parts]
                    + [pl.BlockSpec((None, 1, s_pad), lambda b, i, h: (b, 0, 0))]
                    + [pl.BlockSpec((None, s_pad, x.shape[-1]), lambda b, i, h: (b, 0, 0)) for x in kv_parts])
        grid, params = (batch, t_pad // bt, heads // hb), backend.gpu_params()
    else:
        kernel = functools.partial(_lse_kernel_tpu, scale=scale, num_keys=keys)
        column = pl.BlockSpec((None, bt, 1), lambda b, i, s: (b, i, 0))
        stat = pl.BlockSpec((None, bt, heads, 1), lambda b, i, s: (b, i, 0, 0))
        in_specs = [column, column, pl.BlockSpec((None, bt, heads, q.shape[-1]), lambda b, i, s: (b, i, 0, 0)),
                    pl.BlockSpec((None, 1, bs), lambda b, i, s: (b, 0, s)),
                    pl.BlockSpec((None, bs, kv.shape[-1]), lambda b, i, s: (b, s, 0))]
        grid, params = (batch, t_pad // bt, s_pad // bs), _tpu_params("parallel", "parallel", "arbitrary")
    m, l = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=[stat, stat],
                          out_shape=[stat_shape, stat_shape], compiler_params=params, interpret=backend.interpret,
                          name="attention_lse")(q_pos, q_seg, *q_parts, k_seg, *kv_parts)
    return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _dense_probs(q, kv, seg, kv_seg, pos, lse, scale, backend, plan):
    """Head-averaged probabilities [B, T_pad, S_pad] given the per-head lse [B, T_pad, H_pad, 1]."""
    batch, heads, keys = q.shape[0], plan["padded_heads"], kv.shape[1]
    bt, bs, hb, t_pad, s_pad = (plan[k] for k in ("block_t", "block_s", "head_block", "t_pad", "s_pad"))
    q_pos, q_seg, q_parts, k_seg, kv_parts = _dense_operands(q, kv, seg, kv_seg, pos, plan)
    kernel = functools.partial(_prob_kernel, n_parts=len(q_parts), heads=q.shape[2], head_block=hb, scale=scale,
                               num_keys=keys)
    column = pl.BlockSpec((None, bt, 1), lambda b, i, s: (b, i, 0))
    in_specs = ([column, column]
                + [pl.BlockSpec((None, bt, heads, x.shape[-1]), lambda b, i, s: (b, i, 0, 0)) for x in q_parts]
                + [pl.BlockSpec((None, bt, heads, 1), lambda b, i, s: (b, i, 0, 0)),
                   pl.BlockSpec((None, 1, bs), lambda b, i, s: (b, 0, s))]
                + [pl.BlockSpec((None, bs, x.shape[-1]), lambda b, i, s: (b, s, 0)) for x in kv_parts])
    params = backend.gpu_params() if backend.kind == "gpu" else _tpu_params("parallel", "parallel", "parallel")
    return pl.pallas_call(kernel, grid=(batch, t_pad // bt, s_pad // bs), in_specs=in_specs,
                          out_specs=pl.BlockSpec((None, bt, bs), lambda b, i, s: (b, i, s)),
                          out_shape=jax.ShapeDtypeStruct((batch, t_pad, s_pad), jnp.float32),
                          compiler_params=params, interpret=backend.interpret,
                          name="attention_target")(q_pos, q_seg, *q_parts, lse, k_seg, *kv_parts)


# ---------------------------------------------------------------------------------------------
# Pallas kernels (at indices).
# ---------------------------------------------------------------------------------------------


def _at_kernel_gpu(*refs, n_parts, scale, block_k, given_lse, heads):
    """GPU style: gathers kv rows by vector-indexing the (whole) kv part refs. A program handles
    one head block and writes its heads' share of the head mean (the wrapper adds the blocks)."""
    q_refs, kv_refs = refs[:n_parts], refs[n_parts:2 * n_parts]
    idx_ref, lse_ref, p_ref = refs[2 * n_parts:]
    block_t, padded_heads, _ = q_refs[0].shape  # padded_heads: this program's head block
    qs = [q_ref[...] for q_ref in q_refs]
    used = _used_chunks(idx_ref[...], block_k)

    def scores(c):  # [bt, H_padded, bk]
        idx = idx_ref[:, pl.ds(c * block_k, block_k)]
        s = None
        for q, kv_ref in zip(qs, kv_refs):
            rows, valid = _gather_block(kv_ref, idx, block_t, block_k)
            part = _bdot(q, rows, 2, 2)
            s = part if s is None else s + part
        return jnp.where(valid[:, None, :], s * scale, -jnp.inf)

    if given_lse:
        lse = lse_ref[...].reshape(block_t, padded_heads, 1)
    else:
        def stats(c, carry):
            return _online_lse_step(*carry, scores(c))

        peak, total = jax.lax.fori_loop(0, used, stats, (jnp.full((block_t, padded_heads, 1), -jnp.inf, jnp.float32),
                                                         jnp.zeros((block_t, padded_heads, 1), jnp.float32)))
        lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    head = pl.program_id(2) * padded_heads + jax.lax.broadcasted_iota(jnp.int32, (1, padded_heads, 1), 1)

    def head_mean(c):
        p = jnp.where(head < heads, _probs(scores(c), lse), 0.0)
        return jnp.sum(p, axis=1) * (1.0 / heads)

    def write(c, _):  # every slot chunk written exactly once (no zero-fill then overwrite: racy on GPU)
        zeros = lambda: jnp.zeros((block_t, block_k), jnp.float32)
        p_ref[:, pl.ds(c * block_k, block_k)] = jax.lax.cond(c < used, lambda: head_mean(c), zeros)
        return 0

    jax.lax.fori_loop(0, p_ref.shape[1] // block_k, write, 0)


def _at_call_gpu(q, kv, indices, lse, scale, block_t, block_k, head_block, backend):
    batch, length, heads, dk = q.shape
    keys, k = kv.shape[1], indices.shape[-1]
    compiled = backend.compiled_for_gpu
    block_t = min(be.next_pow2(block_t), be.next_pow2(length))
    block_k = min(be.next_pow2(block_k), be.next_pow2(k))
    if compiled:  # 2-D dots only (Triton): one query per program, its heads the matmul rows
        block_t, block_k = 1, max(block_k, 16)
    t_pad, k_pad = be.round_up(length, block_t), be.round_up(k, block_k)
    padded_heads = max(be.next_pow2(heads), 16 if compiled else 1)
    head_block = min(be.next_pow2(head_block), padded_heads) if head_block else padded_heads
    head_blocks = padded_heads // head_block
    widths = be.pow2_parts(dk, 16 if compiled else 1)
    pad_t = lambda x, fill=0: be.pad_axis(x, 1, t_pad, fill)
    q_parts = be.split_last(pad_t(be.pad_axis(q, 2, padded_heads)), widths)
    kv_parts = be.split_last(kv, widths)
    lse_in = jnp.zeros((batch, length, heads), jnp.float32) if lse is None else lse.astype(jnp.float32)
    lse_in = pad_t(be.pad_axis(lse_in, 2, padded_heads))
    p = pl.pallas_call(
        functools.partial(_at_kernel_gpu, n_parts=len(widths), scale=scale, block_k=block_k,
                          given_lse=lse is not None, heads=heads),
        grid=(batch, t_pad // block_t, head_blocks),
        in_specs=([pl.BlockSpec((None, block_t, head_block, w), lambda b, i, h: (b, i, h, 0)) for w in widths]
                  + [pl.BlockSpec((None, keys, w), lambda b, i, h: (b, 0, 0)) for w in widths]
                  + [pl.BlockSpec((None, block_t, k_pad), lambda b, i, h: (b, i, 0)),
                     pl.BlockSpec((None, block_t, head_block), lambda b, i, h: (b, i, h))]),
        out_specs=pl.BlockSpec((None, block_t, None, k_pad), lambda b, i, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, t_pad, head_blocks, k_pad), jnp.float32),
        compiler_params=backend.gpu_params(num_warps=8 if head_block * block_t >= 64 else 4),
        interpret=backend.interpret,
        name="attention_target_at",
    )(*q_parts, *kv_parts, pad_t(be.pad_axis(indices, 2, k_pad, -1), -1), lse_in)
    return jnp.sum(p, axis=2)[:, :length, :k]


def _at_kernel_tpu(idx_smem, q_ref, idx_ref, lse_ref, kv_hbm, p_ref, buf, sem, *, scale, block_k, t_pad, k_pad,
                   given_lse):
    """TPU style: indices scalar-prefetched, rows DMA'd from HBM into a double-buffered VMEM
    buffer (as `sparse_mla`'s TPU kernel); one query at a time, its H heads the matmul rows."""
    block_t, heads, _ = q_ref.shape
    b, i = pl.program_id(0), pl.program_id(1)
    chunks = k_pad // block_k

    def token(t, _):
        base = ((b * t_pad) + i * block_t + t) * k_pad
        q = q_ref[t]  # [H, Dk]

        def over_chunks(fn, init):
            """fn(slots, scores [H, bk], carry) over the slot chunks, rows fetched one chunk ahead."""

            def chunk(c, rows, carry):
                slots = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
                valid = idx_ref[pl.ds(t, 1), slots] >= 0  # [1, bk]
                s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                return fn(slots, jnp.where(valid, s * scale, -jnp.inf), carry)

            return _over_row_chunks(kv_hbm, buf, sem, idx_smem, b, base, block_k, chunks, chunk, init)

        if given_lse:
            lse = lse_ref[t]  # [H, 1]
        else:
            init = (jnp.full((heads, 1), -jnp.inf, jnp.float32), jnp.zeros((heads, 1), jnp.float32))
            peak, total = over_chunks(lambda slots, s, carry: _online_lse_step(*carry, s), init)
            lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)

        def write(slots, s, carry):
            p_ref[pl.ds(t, 1), slots] = jnp.sum(_probs(s, lse), axis=0, keepdims=True) * (1.0 / heads)
            return carry

        over_chunks(write, 0)
        return 0

    jax.lax.fori_loop(0, block_t, token, 0)


def _at_call_tpu(q, kv, indices, lse, scale, block_t, block_k, prefetch_limit, backend):
    """The TPU-style kernel over query spans whose indices fit the SMEM prefetch budget."""
    from jax.experimental.pallas import tpu as pltpu

    batch, length, heads, dk = q.shape
    k = indices.shape[-1]
    block_t = min(block_t, be.next_pow2(length))
    block_k = min(block_k, k)
    if backend.compiled_for_tpu:
        block_t = max(block_t, 8)
    k_pad = be.round_up(k, block_k)
    span = max(block_t, (prefetch_limit // max(1, batch * k_pad)) // block_t * block_t)
    span = min(span, be.round_up(length, block_t))
    lse_in = jnp.zeros((batch, length, heads), jnp.float32) if lse is None else lse.astype(jnp.float32)
    call = pl.pallas_call(
        functools.partial(_at_kernel_tpu, scale=scale, block_k=block_k, t_pad=span, k_pad=k_pad,
                          given_lse=lse is not None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, span // block_t),
            in_specs=[pl.BlockSpec((None, block_t, heads, dk), lambda b, i, *_: (b, i, 0, 0)),
                      pl.BlockSpec((None, block_t, k_pad), lambda b, i, *_: (b, i, 0)),
                      pl.BlockSpec((None, block_t, heads, 1), lambda b, i, *_: (b, i, 0, 0)),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((None, block_t, k_pad), lambda b, i, *_: (b, i, 0)),
            scratch_shapes=[pltpu.VMEM((2, block_k, dk), kv.dtype), pltpu.SemaphoreType.DMA((2,))]),
        out_shape=jax.ShapeDtypeStruct((batch, span, k_pad), jnp.float32),
        compiler_params=_tpu_params("parallel", "arbitrary"),
        interpret=backend.interpret,
        name="attention_target_at_tpu")
    fn = lambda qc, ic, lc: call(ic.reshape(-1), qc, ic, lc, kv)
    arrays = (q, be.pad_axis(indices, 2, k_pad, -1), lse_in[..., None])
    return map_query_chunks(fn, arrays, (0, -1, 0), span, exact=True)[..., :k]


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def _dense_setup(q, kv, segment_ids, kv_segment_ids, q_offset, backend, block_t, block_s, head_block):
    seg, kv_seg, pos = _prepare(q, kv, segment_ids, kv_segment_ids, q_offset)
    batch, length, heads, dk = q.shape
    plan = _dense_plan(backend, batch, length, heads, dk, kv.shape[1], q.dtype.itemsize, block_t, block_s,
                       head_block)
    return (seg, kv_seg, pos), plan


def _pallas_dense_lse(q, kv, segment_ids, kv_segment_ids, q_offset, scale, backend, block_t, block_s, head_block):
    """Pass 1 of the dense kernels: (visibility inputs, block plan, padded lse [B, T', H', 1])."""
    visibility, plan = _dense_setup(q, kv, segment_ids, kv_segment_ids, q_offset, backend, block_t, block_s,
                                    head_block)
    return visibility, plan, _dense_lse(q, kv, *visibility, float(scale), backend, plan)


def attention_lse(q, kv, segment_ids=None, *, scale: float, kv_segment_ids=None, q_offset=None, impl="xla",
                  block_t: int | None = None, block_s: int | None = None, head_block: int | None = None,
                  interpret=None):
    """Per-head log-sum-exp [B, T, H] float32 of the dense causal+segment masked scaled scores.

    block_t / block_s: queries / keys per block (powers of two); head_block (GPU style): heads per
    matmul. Defaults compiled for a GPU: 16 / 64 / 4 (4-byte inputs: 16 / 32 / 2); TPU style:
    max(8, 512 // H) / 512 / all heads; interpreted: 32 / 512 / all heads.
    """
    q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas:
        return attention_lse_reference(q, kv, segment_ids, scale=scale, kv_segment_ids=kv_segment_ids,
                                       q_offset=q_offset)
    _, _, lse = _pallas_dense_lse(q, kv, segment_ids, kv_segment_ids, q_offset, scale, backend, block_t, block_s,
                                  head_block)
    return lse[:, :q.shape[1], :q.shape[2], 0]


def attention_target(q, kv, segment_ids=None, *, scale: float, kv_segment_ids=None, q_offset=None, impl="xla",
                     block_t: int | None = None, block_s: int | None = None, head_block: int | None = None,
                     interpret=None):
    """Dense head-averaged attention probabilities p [B, T, S] float32 (rows sum to 1).

    Block sizes as in `attention_lse`.
    """
    q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas:
        return attention_target_reference(q, kv, segment_ids, scale=scale, kv_segment_ids=kv_segment_ids,
                                          q_offset=q_offset)
    visibility, plan, lse = _pallas_dense_lse(q, kv, segment_ids, kv_segment_ids, q_offset, scale, backend,
                                              block_t, block_s, head_block)
    p = _dense_probs(q, kv, *visibility, lse, float(scale), backend, plan)
    return p[:, :q.shape[1], :kv.shape[1]]


def attention_target_at(q, kv, indices, *, scale: float, lse=None, normalize: bool = True, impl="xla",
                        block_t: int | None = None, block_k: int | None = None, head_block: int | None = None,
                        prefetch_limit: int = 1 << 15, interpret=None):
    """Head-averaged attention probabilities at `indices` [B, T, K] (-1 slots: 0), float32 [B, T, K].

    lse: None (softmax over the selected slots) or [B, T, H] (e.g. `attention_lse`: dense
    probabilities read at the selected keys). normalize: rescale each query's K values to sum 1.
    block_t / block_k / head_block: queries per program / slots per gathered chunk / heads per
    program (GPU style); defaults as `sparse_mla` (compiled for a GPU: 1 / 64 / 64, 4-byte inputs
    1 / 32 / 32; interpreted: 16 / 128 / all heads; TPU style: 8 / 128). prefetch_limit: the most
    indices the TPU-style kernel scalar-prefetches into SMEM per call.
    """
    q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
    lse = None if lse is None else jax.lax.stop_gradient(lse)
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas:
        return attention_target_at_reference(q, kv, indices, scale=scale, lse=lse, normalize=normalize)
    indices = indices.astype(jnp.int32)
    if backend.kind == "tpu":
        p = _at_call_tpu(q, kv, indices, lse, float(scale), block_t or 8, block_k or 128, prefetch_limit, backend)
    elif backend.compiled_for_gpu:
        rows = 32 if q.dtype.itemsize > 2 else 64
        p = _at_call_gpu(q, kv, indices, lse, float(scale), block_t or 1, block_k or rows, head_block or rows,
                         backend)
    else:
        p = _at_call_gpu(q, kv, indices, lse, float(scale), block_t or 16, block_k or 128, head_block, backend)
    return _normalized(p) if normalize else p
