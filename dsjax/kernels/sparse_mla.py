"""Sparse MLA attention (DSA) in MQA form: every query attends to its own K selected latent rows.

    q  [B, T, H, Dk]   absorbed queries: [q_nope W_uk^T | q_rope], Dk = kv_lora_rank + rope dim
    kv [B, S, Dk]      the shared latent [c_kv | k_rope]; its first Dv = kv_lora_rank dims are
                       also the value
    indices [B, T, K]  int32 rows of kv per query; -1 = empty slot
    out[t, h] = sum_j softmax_j(q[t, h] . kv[idx[t, j]] * scale) kv[idx[t, j], :Dv]

Cost O(T K H Dk) whatever S is; no [T, S] tensor anywhere. A query whose K slots are all -1
gets output 0 and log-sum-exp -inf. The indices of one query must be distinct (as top-k makes
them) for the Pallas backward; the reference handles repeats like ordinary indexing.

- `sparse_mla_reference`: gather-based pure JAX, queries processed in chunks under
  `jax.checkpoint` (autodiff keeps O(chunk K Dk) gathered rows alive, not O(T K Dk)); its
  gradients are plain autodiff. This is the model's CPU path.
- GPU-style Pallas kernel (Triton lowering; interpret=True on CPU): grid (batch, query block);
  each program gathers its queries' rows `block_k` at a time by indexing the kv ref with an
  integer vector, online softmax. q and kv enter split into latent (Dv) and rope parts, whose
  widths are powers of two as Triton tiles need (576 = 512 + 64 is not); compiled for a GPU,
  heads, widths and the slot chunk are zero-padded to powers of two >= 16 (tl.dot), and heads are
  split into blocks of `head_block` (a grid axis) so that H = 128 does not put a [128, 512]
  float32 accumulator in one program. Backward: one kernel computes dq and
  scatter-adds each query's dkv rows with `atomic_add` into float32 buffers (one query per
  call, so a call never repeats a row; -1 slots go to dummy rows past S). Programs stop at the
  last non-empty slot chunk, so early (causal) queries do little work.
- TPU-style Pallas kernel (Mosaic; `pltpu.InterpretParams` on CPU): indices scalar-prefetched
  into SMEM (`PrefetchScalarGridSpec`), kv left in HBM (`memory_space=pl.ANY`), rows copied
  with `pltpu.make_async_copy` into a double-buffered VMEM buffer; backward reads-modifies-writes
  the dkv rows in HBM with DMAs (the grid is sequential, "arbitrary"). The wrapper feeds the
  kernel chunks of at most `prefetch_limit` indices (SMEM is small).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsjax.kernels import _backend as be
from dsjax.kernels.chunking import join_chunks, map_query_chunks, split_chunks


# ---------------------------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------------------------


def _gather_rows(kv, indices):
    """kv [B, S, D], indices [B, c, K] (-1 allowed) -> rows [B, c, K, D], valid [B, c, K]."""
    valid = indices >= 0
    safe = jnp.where(valid, indices, 0)
    rows = jax.vmap(lambda table, idx: table[idx])(kv, safe)
    return rows, valid


def _attend_rows(q, rows, valid, scale, dv):
    """Softmax attention of q [B, c, H, Dk] over its own rows [B, c, K, Dk]; (out, lse).

    Scores are laid out [B, c, K, H] (slots before heads): XLA:CPU runs these small per-query
    matmuls several times faster in that layout than as [B, c, H, K].
    """
    scores = jnp.einsum("bthd,btkd->btkh", q, rows, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(valid[..., None], scores, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=2, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=2, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    # The value product runs over all Dk columns and is sliced afterwards: slicing the gathered
    # rows to Dv first makes autodiff pad their gradient back to Dk, which ran ~2x slower on CPU.
    out = jnp.einsum("btkh,btkd->bthd", probs.astype(rows.dtype), rows,
                     preferred_element_type=jnp.float32)[..., :dv]
    peak, total = peak[:, :, 0], total[:, :, 0]  # [B, c, H]
    lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse


def _default_chunk(batch, heads, k, dk, itemsize, budget=2 << 20):
    """Queries per chunk: ~2 MiB of gathered rows and scores, which keeps a chunk in cache
    (on CPU, chunks of a few MiB ran 3-5x faster than chunks of 64 MiB)."""
    per_query = batch * k * (dk * itemsize + 3 * heads * 4)
    return max(1, budget // max(1, per_query))


def sparse_mla_reference(q, kv, indices, *, scale: float, dv: int, query_chunk: int | None = None):
    """Gather-based sparse MLA, (out [B, T, H, Dv] in q.dtype, lse [B, T, H] float32).

    Memory O(B T H Dk + chunk K Dk) forward and backward (autodiff through a checkpointed
    `lax.map` over query chunks).
    """
    batch, _, heads, dk = q.shape
    if query_chunk is None:
        query_chunk = _default_chunk(batch, heads, indices.shape[-1], dk, kv.dtype.itemsize)

    def chunk(qc, ic):
        rows, valid = _gather_rows(kv, ic)
        return _attend_rows(qc, rows, valid, scale, dv)

    return map_query_chunks(chunk, (q, indices), (0, -1), query_chunk, checkpoint=True)


# ---------------------------------------------------------------------------------------------
# GPU-style Pallas kernels.
# ---------------------------------------------------------------------------------------------


def _bdot(a, b, contract_a, contract_b):
    """Per-query (leading axis) matmul; 2-D `dot` when the block holds one query (Triton)."""
    dims = (((contract_a,), (contract_b,)), ((0,), (0,)))
    if a.shape[0] == 1:
        dims2 = (((contract_a - 1,), (contract_b - 1,)), ((), ()))
        return jax.lax.dot_general(a[0], b[0], dims2, preferred_element_type=jnp.float32)[None]
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _used_chunks(idx, block_k):
    """Number of `block_k` slot chunks up to the last non-empty slot of any query in the block."""
    slot = jax.lax.broadcasted_iota(jnp.int32, idx.shape, 1)
    last = jnp.max(jnp.where(idx >= 0, slot + 1, 0))
    return (last + block_k - 1) // block_k


def _gather_block(kv_ref, idx, block_t, block_k):
    """Rows kv_ref[idx] ([bt, bk] indices, -1 -> row 0) as [bt, bk, D], and the valid mask."""
    valid = idx >= 0
    rows = kv_ref[jnp.where(valid, idx, 0).reshape(block_t * block_k), :]
    return rows.reshape(block_t, block_k, rows.shape[-1]), valid


# The GPU kernels take the latent ([..., :Dv], also the value) and rope ([..., Dv:]) parts of q
# and kv as separate refs: scores = q_lat . kv_lat + q_rope . kv_rope. Both widths are powers
# of two in DeepSeek's shapes (512 + 64; small_v32: 128 + 32), as Triton tiles require, where
# the joint width 576 is not.


def _split_scores(q_lat, q_rope, lat_rows, rope_rows, scale):
    s = _bdot(q_lat, lat_rows, 2, 2)
    if q_rope is not None:
        s = s + _bdot(q_rope, rope_rows, 2, 2)
    return s * scale


def _fwd_kernel_gpu(ql_ref, qr_ref, kvl_ref, kvr_ref, idx_ref, o_ref, lse_ref, *, scale, block_k, has_rope):
    block_t, heads, dv = ql_ref.shape
    q_lat, q_rope = ql_ref[...], (qr_ref[...] if has_rope else None)

    def body(c, carry):
        peak, total, acc = carry
        idx = idx_ref[:, pl.ds(c * block_k, block_k)]
        lat, valid = _gather_block(kvl_ref, idx, block_t, block_k)
        rope = _gather_block(kvr_ref, idx, block_t, block_k)[0] if has_rope else None
        s = jnp.where(valid[:, None, :], _split_scores(q_lat, q_rope, lat, rope, scale), -jnp.inf)  # [bt, H, bk]
        new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
        safe = jnp.where(new_peak == -jnp.inf, 0.0, new_peak)
        alpha = jnp.exp(peak - safe)
        p = jnp.exp(s - safe[..., None])
        total = total * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + _bdot(p.astype(lat.dtype), lat, 2, 1)
        return new_peak, total, acc

    init = (jnp.full((block_t, heads), -jnp.inf, jnp.float32), jnp.zeros((block_t, heads), jnp.float32),
            jnp.zeros((block_t, heads, dv), jnp.float32))
    peak, total, acc = jax.lax.fori_loop(0, _used_chunks(idx_ref[...], block_k), body, init)
    nonempty = total > 0
    o_ref[...] = (acc / jnp.where(nonempty, total, 1.0)[..., None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, peak + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)


def _bwd_kernel_gpu(ql_ref, qr_ref, kvl_ref, kvr_ref, idx_ref, do_ref, lse_ref, delta_ref, _dl_in, _dr_in,
                    dql_ref, dqr_ref, dkvl_ref, dkvr_ref, *, scale, block_k, num_keys, has_rope):
    from jax.experimental.pallas import triton as plgpu

    block_t, heads, dv = ql_ref.shape
    q_lat, q_rope = ql_ref[...], (qr_ref[...] if has_rope else None)
    do = do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    dummy = num_keys + jax.lax.broadcasted_iota(jnp.int32, (block_t, block_k), 1)
    lat_cols = jax.lax.broadcasted_iota(jnp.int32, (1, dv), 1)
    rope_cols = jax.lax.broadcasted_iota(jnp.int32, (1, qr_ref.shape[-1]), 1)

    def body(c, carry):
        dq_lat, dq_rope = carry
        idx = idx_ref[:, pl.ds(c * block_k, block_k)]
        lat, valid = _gather_block(kvl_ref, idx, block_t, block_k)
        rope = _gather_block(kvr_ref, idx, block_t, block_k)[0] if has_rope else None
        s = _split_scores(q_lat, q_rope, lat, rope, scale)
        live = valid[:, None, :] & (lse[..., None] > -jnp.inf)
        p = jnp.where(live, jnp.exp(s - lse[..., None]), 0.0)  # [bt, H, bk]
        dp = _bdot(do.astype(lat.dtype), lat, 2, 2)
        ds = p * (dp - delta[..., None])
        ds_rows = ds.astype(lat.dtype)
        dq_lat = dq_lat + _bdot(ds_rows, lat, 2, 1) * scale
        # rows' gradients [bt, bk, .]: keys ds^T q * scale, values p^T do (latent part only)
        d_lat = _bdot(ds.astype(q_lat.dtype), q_lat, 1, 1) * scale + _bdot(p.astype(do.dtype), do, 1, 1)
        target = jnp.where(valid, idx, dummy)
        if has_rope:
            dq_rope = dq_rope + _bdot(ds_rows, rope, 2, 1) * scale
            d_rope = _bdot(ds.astype(q_rope.dtype), q_rope, 1, 1) * scale
        for t in range(block_t):  # one query per call: its rows are distinct
            plgpu.atomic_add(dkvl_ref, (target[t][:, None], lat_cols), d_lat[t])
            if has_rope:
                plgpu.atomic_add(dkvr_ref, (target[t][:, None], rope_cols), d_rope[t])
        return dq_lat, dq_rope

    init = (jnp.zeros((block_t, heads, dv), jnp.float32), jnp.zeros(dqr_ref.shape, jnp.float32))
    dq_lat, dq_rope = jax.lax.fori_loop(0, _used_chunks(idx_ref[...], block_k), body, init)
    dql_ref[...] = dq_lat.astype(dql_ref.dtype)
    dqr_ref[...] = dq_rope.astype(dqr_ref.dtype)


def _blocks(length, k, block_t, block_k):
    block_t = min(block_t, be.next_pow2(length))
    block_k = min(block_k, k)
    return block_t, block_k, be.round_up(length, block_t), be.round_up(k, block_k)


def _gpu_operands(q, kv, indices, dv, block_t, block_k, head_block, backend):
    """Split/pad operands for the GPU kernels: (q_lat, q_rope, kv_lat, kv_rope, indices, sizes).

    Triton tiles need power-of-two sizes, and its dot >= 16 per dimension: compiled for a GPU,
    heads, both widths and the slot chunk are padded to powers of two >= 16 (zero heads, columns
    and -1 slots change nothing and are sliced off). A missing rope part becomes a zero column.
    """
    batch, length, heads, dk = q.shape
    k = indices.shape[-1]
    least = 16 if backend.compiled_for_gpu else 1
    block_t = min(be.next_pow2(block_t), be.next_pow2(length))
    block_k = max(min(be.next_pow2(block_k), be.next_pow2(k)), least)
    t_pad, k_pad = be.round_up(length, block_t), be.round_up(k, block_k)
    lat, rope = be.next_pow2(max(dv, least)), be.next_pow2(max(dk - dv, least))
    padded_heads = be.next_pow2(max(heads, least)) if backend.compiled_for_gpu else heads
    head_block = min(be.next_pow2(head_block), padded_heads) if head_block else padded_heads
    if padded_heads % head_block:
        head_block = padded_heads
    q = be.pad_axis(be.pad_axis(q, 1, t_pad), 2, padded_heads)
    cut = lambda x: (be.pad_axis(x[..., :dv], x.ndim - 1, lat), be.pad_axis(x[..., dv:], x.ndim - 1, rope))
    ip = be.pad_axis(be.pad_axis(indices, 2, k_pad, -1), 1, t_pad, -1)
    sizes = dict(block_t=block_t, block_k=block_k, t_pad=t_pad, k_pad=k_pad, heads=padded_heads,
                 head_block=head_block, lat=lat, rope=rope)
    return (*cut(q), *cut(kv), ip, sizes)


def _gpu_specs(sizes):
    """Block specs over the grid (batch, query block, head block)."""
    bt, hb, k_pad = sizes["block_t"], sizes["head_block"], sizes["k_pad"]
    per_query = lambda width: pl.BlockSpec((None, bt, hb, width), lambda b, i, h: (b, i, h, 0))
    whole = lambda rows, width: pl.BlockSpec((None, rows, width), lambda b, i, h: (b, 0, 0))
    per_head = pl.BlockSpec((None, bt, hb), lambda b, i, h: (b, i, h))
    slots = pl.BlockSpec((None, bt, k_pad), lambda b, i, h: (b, i, 0))
    return per_query, whole, per_head, slots


def _gpu_grid(batch, sizes):
    return batch, sizes["t_pad"] // sizes["block_t"], sizes["heads"] // sizes["head_block"]


def _gpu_warps(sizes):
    """8 warps once a program's accumulator [bt * hb, lat] float32 passes 16K values."""
    return 8 if sizes["block_t"] * sizes["head_block"] * sizes["lat"] > (16 << 10) else 4


def _fwd_gpu(q, kv, indices, scale, dv, block_t, block_k, head_block, backend):
    batch, length, heads, dk = q.shape
    keys = kv.shape[1]
    q_lat, q_rope, kv_lat, kv_rope, ip, sz = _gpu_operands(q, kv, indices, dv, block_t, block_k, head_block,
                                                           backend)
    per_query, whole, per_head, slots = _gpu_specs(sz)
    lat, rope = sz["lat"], sz["rope"]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel_gpu, scale=scale, block_k=sz["block_k"], has_rope=dk > dv),
        grid=_gpu_grid(batch, sz),
        in_specs=[per_query(lat), per_query(rope), whole(keys, lat), whole(keys, rope), slots],
        out_specs=[per_query(lat), per_head],
        out_shape=[jax.ShapeDtypeStruct((batch, sz["t_pad"], sz["heads"], lat), q.dtype),
                   jax.ShapeDtypeStruct((batch, sz["t_pad"], sz["heads"]), jnp.float32)],
        compiler_params=backend.gpu_params(num_warps=_gpu_warps(sz)),
        interpret=backend.interpret,
        name="sparse_mla_fwd",
    )(q_lat, q_rope, kv_lat, kv_rope, ip)
    return out[:, :length, :heads, :dv], lse[:, :length, :heads]


def _bwd_gpu(q, kv, indices, do, lse, delta, scale, dv, block_t, block_k, head_block, backend):
    batch, length, heads, dk = q.shape
    keys = kv.shape[1]
    q_lat, q_rope, kv_lat, kv_rope, ip, sz = _gpu_operands(q, kv, indices, dv, block_t, block_k, head_block,
                                                           backend)
    per_query, whole, per_head, slots = _gpu_specs(sz)
    lat, rope = sz["lat"], sz["rope"]
    pad = lambda x: be.pad_axis(be.pad_axis(x, 1, sz["t_pad"]), 2, sz["heads"])
    rows = keys + sz["block_k"]  # dummy rows past S receive the -1 slots
    acc = lambda width: jnp.zeros((batch, rows, width), jnp.float32)
    dq_lat, dq_rope, dkv_lat, dkv_rope = pl.pallas_call(
        functools.partial(_bwd_kernel_gpu, scale=scale, block_k=sz["block_k"], num_keys=keys, has_rope=dk > dv),
        grid=_gpu_grid(batch, sz),
        in_specs=[per_query(lat), per_query(rope), whole(keys, lat), whole(keys, rope), slots,
                  per_query(lat), per_head, per_head, whole(rows, lat), whole(rows, rope)],
        out_specs=[per_query(lat), per_query(rope), whole(rows, lat), whole(rows, rope)],
        out_shape=[jax.ShapeDtypeStruct(q_lat.shape, q.dtype), jax.ShapeDtypeStruct(q_rope.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, rows, lat), jnp.float32),
                   jax.ShapeDtypeStruct((batch, rows, rope), jnp.float32)],
        input_output_aliases={8: 2, 9: 3},
        compiler_params=backend.gpu_params(num_warps=_gpu_warps(sz)),
        interpret=backend.interpret,
        name="sparse_mla_bwd",
    )(q_lat, q_rope, kv_lat, kv_rope, ip, pad(be.pad_axis(do, 3, lat)), pad(lse), pad(delta), acc(lat), acc(rope))
    dq = jnp.concatenate([dq_lat[..., :dv], dq_rope[..., :dk - dv]], -1)[:, :length, :heads]
    dkv = jnp.concatenate([dkv_lat[..., :dv], dkv_rope[..., :dk - dv]], -1)[:, :keys]
    return dq, dkv.astype(kv.dtype)


# ---------------------------------------------------------------------------------------------
# TPU-style Pallas kernels (scalar-prefetched indices, rows DMA'd from HBM).
# ---------------------------------------------------------------------------------------------


def _row_copies(kv_hbm, buf, sem, idx_smem, batch, base, block_k, slot):
    """DMA descriptors bringing kv rows idx_smem[base + j] (0 for -1) into buf[slot, j]."""
    from jax.experimental.pallas import tpu as pltpu

    copies = []
    for j in range(block_k):
        row = idx_smem[base + j]
        row = jnp.where(row >= 0, row, 0)
        copies.append(pltpu.make_async_copy(kv_hbm.at[batch, pl.ds(row, 1)], buf.at[slot, pl.ds(j, 1)],
                                            sem.at[slot]))
    return copies


def _over_row_chunks(kv_hbm, buf, sem, idx_smem, batch, base, block_k, chunks, body, init):
    """fori_loop over one query's slot chunks: body(c, rows [bk, Dk], carry), the rows of chunk
    c + 1 being DMA'd into the other half of `buf` while chunk c is used (double buffering)."""
    for cp in _row_copies(kv_hbm, buf, sem, idx_smem, batch, base, block_k, 0):
        cp.start()

    def chunk(c, carry):
        slot = c % 2

        @pl.when(c + 1 < chunks)
        def _prefetch():
            for cp in _row_copies(kv_hbm, buf, sem, idx_smem, batch, base + (c + 1) * block_k, block_k, 1 - slot):
                cp.start()

        for cp in _row_copies(kv_hbm, buf, sem, idx_smem, batch, base + c * block_k, block_k, slot):
            cp.wait()
        return body(c, buf[slot], carry)

    return jax.lax.fori_loop(0, chunks, chunk, init)


def _fwd_kernel_tpu(idx_smem, q_ref, idx_ref, kv_hbm, o_ref, lse_ref, buf, sem, *,
                    scale, dv, block_k, t_pad, k_pad):
    block_t, heads, _ = q_ref.shape
    b, i = pl.program_id(0), pl.program_id(1)
    chunks = k_pad // block_k

    def token(t, _):
        base = ((b * t_pad) + i * block_t + t) * k_pad
        q = q_ref[t]  # [H, Dk]

        def chunk(c, rows, carry):  # rows [bk, Dk]
            peak, total, acc = carry
            valid = idx_ref[pl.ds(t, 1), pl.ds(c * block_k, block_k)] >= 0  # [1, bk]
            s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            s = jnp.where(valid, s, -jnp.inf)  # [H, bk]
            new_peak = jnp.maximum(peak, jnp.max(s, axis=-1, keepdims=True))
            safe = jnp.where(new_peak == -jnp.inf, 0.0, new_peak)
            alpha = jnp.exp(peak - safe)
            p = jnp.exp(s - safe)
            total = total * alpha + jnp.sum(p, axis=-1, keepdims=True)
            acc = acc * alpha + jnp.dot(p.astype(rows.dtype), rows[:, :dv], preferred_element_type=jnp.float32)
            return new_peak, total, acc

        init = (jnp.full((heads, 1), -jnp.inf, jnp.float32), jnp.zeros((heads, 1), jnp.float32),
                jnp.zeros((heads, dv), jnp.float32))
        peak, total, acc = _over_row_chunks(kv_hbm, buf, sem, idx_smem, b, base, block_k, chunks, chunk, init)
        nonempty = total > 0
        o_ref[t] = (acc / jnp.where(nonempty, total, 1.0)).astype(o_ref.dtype)
        lse = jnp.where(nonempty, peak + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)
        lse_ref[pl.ds(t, 1), :] = lse.reshape(1, heads)
        return 0

    jax.lax.fori_loop(0, block_t, token, 0)


def _bwd_kernel_tpu(idx_smem, q_ref, idx_ref, do_ref, lse_ref, delta_ref, kv_hbm, _dkv_in, dq_ref, dkv_hbm,
                    buf, dbuf, sem, dsem, *, scale, dv, block_k, t_pad, k_pad, num_keys):
    from jax.experimental.pallas import tpu as pltpu

    block_t, heads, dk = q_ref.shape
    b, i = pl.program_id(0), pl.program_id(1)
    chunks = k_pad // block_k

    def dkv_copies(base, to_hbm):
        copies = []
        for j in range(block_k):
            row = idx_smem[base + j]
            row = jnp.where(row >= 0, row, num_keys + j)  # -1 slots go to distinct dummy rows
            hbm, vmem = dkv_hbm.at[b, pl.ds(row, 1)], dbuf.at[pl.ds(j, 1)]
            copies.append(pltpu.make_async_copy(vmem, hbm, dsem.at[0]) if to_hbm
                          else pltpu.make_async_copy(hbm, vmem, dsem.at[0]))
        return copies

    def token(t, _):
        base = ((b * t_pad) + i * block_t + t) * k_pad
        q = q_ref[t]  # [H, Dk]
        do = do_ref[t]  # [H, Dv]
        lse = lse_ref[pl.ds(t, 1), :].reshape(heads, 1)
        delta = delta_ref[pl.ds(t, 1), :].reshape(heads, 1)

        def chunk(c, rows, dq):  # rows [bk, Dk]
            cbase = base + c * block_k
            reads = dkv_copies(cbase, to_hbm=False)
            for cp in reads:
                cp.start()
            valid = idx_ref[pl.ds(t, 1), pl.ds(c * block_k, block_k)] >= 0
            s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            live = valid & (lse > -jnp.inf)
            p = jnp.where(live, jnp.exp(s - lse), 0.0)  # [H, bk]
            dp = jax.lax.dot_general(do.astype(rows.dtype), rows[:, :dv], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            ds = p * (dp - delta)
            dq = dq + jnp.dot(ds.astype(rows.dtype), rows, preferred_element_type=jnp.float32) * scale
            tdims = (((0,), (0,)), ((), ()))
            contrib = jax.lax.dot_general(ds.astype(q.dtype), q, tdims, preferred_element_type=jnp.float32) * scale
            dvals = jax.lax.dot_general(p.astype(do.dtype), do, tdims, preferred_element_type=jnp.float32)
            for cp in reads:
                cp.wait()
            dbuf[...] = dbuf[...] + contrib
            dbuf[:, :dv] = dbuf[:, :dv] + dvals  # the value part of the rows: their first Dv dims
            writes = dkv_copies(cbase, to_hbm=True)
            for cp in writes:
                cp.start()
            for cp in writes:
                cp.wait()
            return dq

        dq = _over_row_chunks(kv_hbm, buf, sem, idx_smem, b, base, block_k, chunks, chunk,
                              jnp.zeros((heads, dk), jnp.float32))
        dq_ref[t] = dq.astype(dq_ref.dtype)
        return 0

    jax.lax.fori_loop(0, block_t, token, 0)


def _tpu_call(kernel_fn, q, kv, indices, extra_blocked, scale, dv, block_t, block_k, prefetch_limit,
              interpret, backward):
    """Run a TPU-style kernel over query chunks small enough for SMEM.

    extra_blocked: [B, T, H, *] arrays blocked like q (backward: do, lse, delta).
    Returns (out, lse) for the forward, (dq, dkv) for the backward.
    """
    from jax.experimental.pallas import tpu as pltpu

    batch, length, heads, dk = q.shape
    keys = kv.shape[1]
    block_t, block_k, _, k_pad = _blocks(length, indices.shape[-1], block_t, block_k)
    span = max(block_t, (prefetch_limit // max(1, batch * k_pad)) // block_t * block_t)
    span = min(span, be.round_up(length, block_t))
    ip = be.pad_axis(indices, 2, k_pad, -1)

    def spec(x):
        nd = x.ndim - 1  # per-chunk rank
        return pl.BlockSpec((None, block_t, *x.shape[3:]), lambda b, i, *_: (b, i) + (0,) * (nd - 2))

    grid = (batch, span // block_t)
    params = dict(scale=scale, dv=dv, block_k=block_k, t_pad=span, k_pad=k_pad)
    compiler_params = pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary"))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    q_spec = pl.BlockSpec((None, block_t, heads, dk), lambda b, i, *_: (b, i, 0, 0))
    i_spec = pl.BlockSpec((None, block_t, k_pad), lambda b, i, *_: (b, i, 0))
    row_buf = pltpu.VMEM((2, block_k, dk), kv.dtype)
    if not backward:
        call = pl.pallas_call(
            functools.partial(kernel_fn, **params),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=grid,
                in_specs=[q_spec, i_spec, any_spec],
                out_specs=[pl.BlockSpec((None, block_t, heads, dv), lambda b, i, *_: (b, i, 0, 0)),
                           pl.BlockSpec((None, block_t, heads), lambda b, i, *_: (b, i, 0))],
                scratch_shapes=[row_buf, pltpu.SemaphoreType.DMA((2,))]),
            out_shape=[jax.ShapeDtypeStruct((batch, span, heads, dv), q.dtype),
                       jax.ShapeDtypeStruct((batch, span, heads), jnp.float32)],
            compiler_params=compiler_params, interpret=interpret, name="sparse_mla_fwd_tpu")
        attend = lambda qc, ic: call(ic.reshape(-1), qc, ic, kv)
        return map_query_chunks(attend, (q, ip), (0, -1), span, exact=True)

    q_c, i_c = split_chunks(q, span), split_chunks(ip, span, -1)
    do_c, lse_c, delta_c = (split_chunks(x, span) for x in extra_blocked)
    rows = keys + block_k
    call = pl.pallas_call(
        functools.partial(kernel_fn, num_keys=keys, **params),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid,
            in_specs=[q_spec, i_spec, spec(do_c), spec(lse_c), spec(delta_c), any_spec, any_spec],
            out_specs=[q_spec, any_spec],
            scratch_shapes=[row_buf, pltpu.VMEM((block_k, dk), jnp.float32), pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SemaphoreType.DMA((1,))]),
        out_shape=[jax.ShapeDtypeStruct((batch, span, heads, dk), q.dtype),
                   jax.ShapeDtypeStruct((batch, rows, dk), jnp.float32)],
        input_output_aliases={7: 1},  # operand 7 counts the scalar-prefetch operand
        compiler_params=compiler_params, interpret=interpret, name="sparse_mla_bwd_tpu")

    def step(dkv, a):
        qc, ic, doc, lc, dc = a
        dq, dkv = call(ic.reshape(-1), qc, ic, doc, lc, dc, kv, dkv)
        return dkv, dq

    dkv, dq = jax.lax.scan(step, jnp.zeros((batch, rows, dk), jnp.float32), (q_c, i_c, do_c, lse_c, delta_c))
    dq = join_chunks(dq, length)
    return dq, dkv[:, :keys].astype(kv.dtype)


# ---------------------------------------------------------------------------------------------
# custom_vjp and the public entry point.
# ---------------------------------------------------------------------------------------------


def _make_pallas_fn(scale, dv, backend, block_t, block_k, head_block, prefetch_limit):
    if backend.kind == "tpu":
        fwd_impl = lambda q, kv, idx: _tpu_call(_fwd_kernel_tpu, q, kv, idx, (), scale, dv, block_t, block_k,
                                                prefetch_limit, backend.interpret, False)
        bwd_impl = lambda q, kv, idx, do, lse, delta: _tpu_call(
            _bwd_kernel_tpu, q, kv, idx, (do, lse, delta), scale, dv, block_t, block_k, prefetch_limit,
            backend.interpret, True)
    else:
        fwd_impl = lambda q, kv, idx: _fwd_gpu(q, kv, idx, scale, dv, block_t, block_k, head_block, backend)
        bwd_impl = lambda q, kv, idx, do, lse, delta: _bwd_gpu(q, kv, idx, do, lse, delta, scale, dv, block_t,
                                                               block_k, head_block, backend)

    @jax.custom_vjp
    def attend(q, kv, indices):
        return fwd_impl(q, kv, indices)

    def fwd(q, kv, indices):
        out, lse = fwd_impl(q, kv, indices)
        return (out, lse), (q, kv, indices, out, lse)

    def bwd(res, cotangents):
        q, kv, indices, out, lse = res
        d_out, d_lse = cotangents
        # d lse / d s = p, so an lse cotangent enters exactly like a shift of delta.
        delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse.astype(jnp.float32)
        dq, dkv = bwd_impl(q, kv, indices, d_out.astype(q.dtype), lse, delta)
        return dq, dkv, None

    attend.defvjp(fwd, bwd)
    return attend


def sparse_mla(q, kv, indices, *, scale: float, dv: int, impl: str = "xla", return_lse: bool = False,
               block_t: int | None = None, block_k: int | None = None, head_block: int | None = None,
               query_chunk: int | None = None, prefetch_limit: int = 1 << 15, interpret=None):
    """Sparse MLA attention over per-query selected latent rows (differentiable in q and kv).

    Args:
      q: [B, T, H, Dk] absorbed queries. kv: [B, S, Dk] latent rows; kv[..., :dv] are the values.
      indices: [B, T, K] int32 rows per query, -1 = skip (distinct per query for Pallas impls).
      scale: softmax scale. dv: value width (kv_lora_rank).
      impl: "xla" | "pallas" | "pallas_gpu" | "pallas_tpu" | "auto".
      block_t / block_k: queries per program / slots per gathered chunk. Defaults: 1 / 64 when
        compiled for a GPU (one token's heads form the matmul rows, as in FlashMLA; 1 / 32 for
        4-byte inputs), 16 / 128 interpreted, 8 / 128 TPU style.
      head_block (GPU style): heads per program (a power of two; the grid gets a head axis).
        Default 64 compiled for a GPU (32 for 4-byte inputs; H = 128: two programs per query,
        each with a [64, 512] float32 accumulator), all heads interpreted.
      query_chunk: queries per chunk of the XLA reference. prefetch_limit: the most indices the
        TPU-style kernel scalar-prefetches into SMEM per call.

    Returns out [B, T, H, dv] (q.dtype), and with `return_lse` the log-sum-exp [B, T, H] float32
    of the scaled scores (-inf for queries with no valid slot; its gradient is supported too).
    """
    backend = be.resolve(impl, interpret)
    if not backend.is_pallas:
        out, lse = sparse_mla_reference(q, kv, indices, scale=scale, dv=dv, query_chunk=query_chunk)
    else:
        if backend.kind == "tpu":
            block_t, block_k = block_t or 8, block_k or 128
        elif backend.compiled_for_gpu:  # 4-byte inputs: half the rows, so operand tiles keep their bytes
            rows = 32 if q.dtype.itemsize > 2 else 64
            block_t, block_k, head_block = block_t or 1, block_k or rows, head_block or rows
        else:
            block_t, block_k = block_t or 16, block_k or 128
        fn = _make_pallas_fn(float(scale), int(dv), backend, block_t, block_k, head_block, prefetch_limit)
        out, lse = fn(q, kv, indices.astype(jnp.int32))
    return (out, lse) if return_lse else out
