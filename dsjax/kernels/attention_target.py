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

The Pallas kernels are BlockSpec-only (GPU style; `attention_target_at` gathers rows by
indexing the kv ref with an integer vector, which Mosaic TPU does not lower, so on TPU it runs
its XLA reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsjax.kernels import _backend as be
from dsjax.kernels.sparse_mla import _gather_block, _gather_rows, _used_chunks, _bdot


def _prepare(q, kv, segment_ids, kv_segment_ids, q_offset):
    return be.visibility_inputs(segment_ids, kv_segment_ids, q_offset, q.shape[0], q.shape[1], kv.shape[1])


def _chunked(fn, arrays, fills, batch, length, chunk):
    """Apply fn to query chunks of [B, T, ...] arrays; outputs [B, chunk, ...] are re-joined."""
    if chunk >= length:
        return fn(*arrays)
    chunks = be.cdiv(length, chunk)
    padded = chunks * chunk

    def split(x, fill):
        x = be.pad_axis(x, 1, padded, fill)
        return jnp.moveaxis(x.reshape(batch, chunks, chunk, *x.shape[2:]), 1, 0)

    outs = jax.lax.map(lambda a: fn(*a), tuple(split(x, f) for x, f in zip(arrays, fills)))
    join = lambda y: jnp.moveaxis(y, 0, 1).reshape(batch, padded, *y.shape[3:])[:, :length]
    return jax.tree.map(join, outs)


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
    batch, length, heads, _ = q.shape
    chunk = query_chunk or _default_chunk(batch, heads, kv.shape[1])
    fn = lambda qc, pc, sc: _safe_lse(_dense_chunk_scores(qc, kv, pc, sc, kv_seg, scale), -1)
    return _chunked(fn, (q, pos, seg), (0, -1, 0), batch, length, chunk)


def attention_target_reference(q, kv, segment_ids=None, *, scale, kv_segment_ids=None, q_offset=None,
                               query_chunk=None):
    seg, kv_seg, pos = _prepare(q, kv, segment_ids, kv_segment_ids, q_offset)
    batch, length, heads, _ = q.shape
    chunk = query_chunk or _default_chunk(batch, heads, kv.shape[1])

    def fn(qc, pc, sc):
        s = _dense_chunk_scores(qc, kv, pc, sc, kv_seg, scale)
        return jnp.mean(_probs(s, _safe_lse(s, -1)[..., None]), axis=2)

    return _chunked(fn, (q, pos, seg), (0, -1, 0), batch, length, chunk)


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

    p = _chunked(fn, (q, indices, lse_in), (0, -1, 0), batch, length, chunk)
    return _normalized(p) if normalize else p


def _normalized(p):
    total = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


# ---------------------------------------------------------------------------------------------
# Pallas kernels (dense).
# ---------------------------------------------------------------------------------------------


def _block_scores(q_ref, kv_ref, qpos_ref, qseg_ref, kseg_ref, start, scale, num_keys):
    block_t, heads, dk = q_ref.shape
    block_s = kv_ref.shape[0]
    s = jax.lax.dot_general(q_ref[...].reshape(block_t * heads, dk), kv_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    s = s.reshape(block_t, heads, block_s) * scale
    k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_t, block_s), 1)
    visible = ((k_pos <= qpos_ref[...][:, None]) & (kseg_ref[...][None, :] == qseg_ref[...][:, None])
               & (k_pos < num_keys))
    return jnp.where(visible[:, None, :], s, -jnp.inf)


def _lse_kernel(qpos_ref, qseg_ref, q_ref, kseg_ref, kv_ref, m_ref, l_ref, *, scale, num_keys):
    s_block = pl.program_id(2)
    start = s_block * kv_ref.shape[0]

    @pl.when(s_block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    @pl.when(start <= jnp.max(qpos_ref[...]))
    def _step():
        s = _block_scores(q_ref, kv_ref, qpos_ref, qseg_ref, kseg_ref, start, scale, num_keys)
        peak = m_ref[...]
        new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
        safe = jnp.where(new_peak == -jnp.inf, 0.0, new_peak)
        l_ref[...] = l_ref[...] * jnp.exp(peak - safe) + jnp.sum(jnp.exp(s - safe[..., None]), axis=-1)
        m_ref[...] = new_peak


def _prob_kernel(qpos_ref, qseg_ref, q_ref, lse_ref, kseg_ref, kv_ref, p_ref, *, scale, num_keys):
    start = pl.program_id(2) * kv_ref.shape[0]
    visible_block = start <= jnp.max(qpos_ref[...])

    @pl.when(visible_block)
    def _step():
        s = _block_scores(q_ref, kv_ref, qpos_ref, qseg_ref, kseg_ref, start, scale, num_keys)
        p_ref[...] = jnp.mean(_probs(s, lse_ref[...][..., None]), axis=1)

    @pl.when(jnp.logical_not(visible_block))
    def _zero():
        p_ref[...] = jnp.zeros(p_ref.shape, jnp.float32)


def _dense_call(kernel, q, kv, seg, kv_seg, pos, lse, block_t, block_s, interpret):
    batch, length, heads, dk = q.shape
    keys = kv.shape[1]
    block_t = min(block_t, be.next_pow2(length))
    block_s = min(block_s, be.next_pow2(keys))
    t_pad, s_pad = be.round_up(length, block_t), be.round_up(keys, block_s)
    pad_t = lambda x, fill=0: be.pad_axis(x, 1, t_pad, fill)
    grid = (batch, t_pad // block_t, s_pad // block_s)
    row = pl.BlockSpec((None, block_t), lambda b, i, s: (b, i))
    per_head = pl.BlockSpec((None, block_t, heads), lambda b, i, s: (b, i, 0))
    in_specs = [row, row, pl.BlockSpec((None, block_t, heads, dk), lambda b, i, s: (b, i, 0, 0))]
    args = [pad_t(pos, -1), pad_t(seg), pad_t(q)]
    if lse is not None:
        in_specs.append(per_head)
        args.append(pad_t(lse))
    in_specs += [pl.BlockSpec((None, block_s), lambda b, i, s: (b, s)),
                 pl.BlockSpec((None, block_s, dk), lambda b, i, s: (b, s, 0))]
    args += [be.pad_axis(kv_seg, 1, s_pad), be.pad_axis(kv, 1, s_pad)]
    if lse is None:
        out_specs = [per_head, per_head]
        out_shape = [jax.ShapeDtypeStruct((batch, t_pad, heads), jnp.float32)] * 2
    else:
        out_specs = pl.BlockSpec((None, block_t, block_s), lambda b, i, s: (b, i, s))
        out_shape = jax.ShapeDtypeStruct((batch, t_pad, s_pad), jnp.float32)
    out = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                         interpret=interpret)(*args)
    if lse is None:
        m, l = out
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return lse[:, :length]
    return out[:, :length, :keys]


# ---------------------------------------------------------------------------------------------
# Pallas kernel (at indices).
# ---------------------------------------------------------------------------------------------


def _at_kernel(q_ref, kv_ref, idx_ref, lse_ref, p_ref, *, scale, block_k, given_lse):
    block_t, heads, _ = q_ref.shape
    q = q_ref[...]
    chunks = _used_chunks(idx_ref[...], block_k)

    def scores(c):
        idx = idx_ref[:, pl.ds(c * block_k, block_k)]
        rows, valid = _gather_block(kv_ref, idx, block_t, block_k)
        s = _bdot(q, rows, 2, 2) * scale
        return jnp.where(valid[:, None, :], s, -jnp.inf)

    if given_lse:
        lse = lse_ref[...]
    else:
        def stats(c, carry):
            peak, total = carry
            s = scores(c)
            new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
            safe = jnp.where(new_peak == -jnp.inf, 0.0, new_peak)
            total = total * jnp.exp(peak - safe) + jnp.sum(jnp.exp(s - safe[..., None]), axis=-1)
            return new_peak, total

        peak, total = jax.lax.fori_loop(0, chunks, stats, (jnp.full((block_t, heads), -jnp.inf, jnp.float32),
                                                           jnp.zeros((block_t, heads), jnp.float32)))
        lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)

    p_ref[...] = jnp.zeros(p_ref.shape, jnp.float32)

    def write(c, _):
        p_ref[:, pl.ds(c * block_k, block_k)] = jnp.mean(_probs(scores(c), lse[..., None]), axis=1)
        return 0

    jax.lax.fori_loop(0, chunks, write, 0)


def _at_call(q, kv, indices, lse, scale, block_t, block_k, interpret):
    batch, length, heads, dk = q.shape
    keys, k = kv.shape[1], indices.shape[-1]
    block_t = min(block_t, be.next_pow2(length))
    block_k = min(block_k, k)
    t_pad, k_pad = be.round_up(length, block_t), be.round_up(k, block_k)
    pad_t = lambda x, fill=0: be.pad_axis(x, 1, t_pad, fill)
    given = lse is not None
    lse_in = jnp.zeros((batch, length, heads), jnp.float32) if lse is None else lse.astype(jnp.float32)
    p = pl.pallas_call(
        functools.partial(_at_kernel, scale=scale, block_k=block_k, given_lse=given),
        grid=(batch, t_pad // block_t),
        in_specs=[pl.BlockSpec((None, block_t, heads, dk), lambda b, i: (b, i, 0, 0)),
                  pl.BlockSpec((None, keys, dk), lambda b, i: (b, 0, 0)),
                  pl.BlockSpec((None, block_t, k_pad), lambda b, i: (b, i, 0)),
                  pl.BlockSpec((None, block_t, heads), lambda b, i: (b, i, 0))],
        out_specs=pl.BlockSpec((None, block_t, k_pad), lambda b, i: (b, i, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, t_pad, k_pad), jnp.float32),
        interpret=interpret,
        name="attention_target_at",
    )(pad_t(q), kv, pad_t(be.pad_axis(indices, 2, k_pad, -1), -1), pad_t(lse_in))
    return p[:, :length, :k]


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def attention_lse(q, kv, segment_ids=None, *, scale: float, kv_segment_ids=None, q_offset=None, impl="xla",
                  block_t: int = 32, block_s: int = 512, interpret=None):
    """Per-head log-sum-exp [B, T, H] float32 of the dense causal+segment masked scaled scores."""
    q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas:
        return attention_lse_reference(q, kv, segment_ids, scale=scale, kv_segment_ids=kv_segment_ids,
                                       q_offset=q_offset)
    seg, kv_seg, pos = _prepare(q, kv, segment_ids, kv_segment_ids, q_offset)
    kernel = functools.partial(_lse_kernel, scale=float(scale), num_keys=kv.shape[1])
    return _dense_call(kernel, q, kv, seg, kv_seg, pos, None, block_t, block_s, backend.interpret)


def attention_target(q, kv, segment_ids=None, *, scale: float, kv_segment_ids=None, q_offset=None, impl="xla",
                     block_t: int = 32, block_s: int = 512, interpret=None):
    """Dense head-averaged attention probabilities p [B, T, S] float32 (rows sum to 1)."""
    q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas:
        return attention_target_reference(q, kv, segment_ids, scale=scale, kv_segment_ids=kv_segment_ids,
                                          q_offset=q_offset)
    seg, kv_seg, pos = _prepare(q, kv, segment_ids, kv_segment_ids, q_offset)
    lse = _dense_call(functools.partial(_lse_kernel, scale=float(scale), num_keys=kv.shape[1]),
                      q, kv, seg, kv_seg, pos, None, block_t, block_s, backend.interpret)
    kernel = functools.partial(_prob_kernel, scale=float(scale), num_keys=kv.shape[1])
    return _dense_call(kernel, q, kv, seg, kv_seg, pos, lse, block_t, block_s, backend.interpret)


def attention_target_at(q, kv, indices, *, scale: float, lse=None, normalize: bool = True, impl="xla",
                        block_t: int = 16, block_k: int = 128, interpret=None):
    """Head-averaged attention probabilities at `indices` [B, T, K] (-1 slots: 0), float32 [B, T, K].

    lse: None (softmax over the selected slots) or [B, T, H] (e.g. `attention_lse`: dense
    probabilities read at the selected keys). normalize: rescale each query's K values to sum 1.
    """
    q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
    lse = None if lse is None else jax.lax.stop_gradient(lse)
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas or backend.kind == "tpu":
        return attention_target_at_reference(q, kv, indices, scale=scale, lse=lse, normalize=normalize)
    p = _at_call(q, kv, indices.astype(jnp.int32), lse, float(scale), block_t, block_k, backend.interpret)
    return _normalized(p) if normalize else p
