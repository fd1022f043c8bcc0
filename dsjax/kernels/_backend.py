"""Backend choice for the DSA kernels, and small helpers they share.

Every kernel module exposes one public function taking `impl=`:

- ``"xla"``: the pure-JAX reference of that module (runs anywhere; memory-lean where it says so).
- ``"pallas"``: the Pallas kernel for the platform JAX runs on: Triton lowering on NVIDIA GPUs,
  Mosaic on TPU; on CPU the GPU-style kernel runs with ``interpret=True`` (ordinary XLA ops).
- ``"pallas_gpu"`` / ``"pallas_tpu"``: force one kernel style. Off its platform the style runs
  interpreted: the GPU style with ``interpret=True``, the TPU style with
  ``pltpu.InterpretParams()`` (a faithful but slow simulation of TPU memory and DMAs).
- ``"auto"``: ``"pallas"`` on GPU/TPU, ``"xla"`` on CPU.

Modules without a separate TPU-style kernel run their generic (BlockSpec-only) kernel for both
styles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("xla", "pallas", "pallas_gpu", "pallas_tpu", "auto")


@dataclasses.dataclass(frozen=True)
class Backend:
    kind: str  # "xla", "gpu" (GPU-style Pallas kernel) or "tpu" (TPU-style Pallas kernel)
    interpret: Any = False  # the value passed to pallas_call(interpret=...)

    @property
    def is_pallas(self) -> bool:
        return self.kind != "xla"

    @property
    def compiled_for_gpu(self) -> bool:
        """True when the kernel is really lowered through Triton (not interpreted)."""
        return self.kind == "gpu" and self.interpret is False

    @property
    def compiled_for_tpu(self) -> bool:
        """True when the kernel is really lowered through Mosaic TPU (not interpreted)."""
        return self.kind == "tpu" and self.interpret is False

    def gpu_params(self, num_warps: int = 4, num_stages: int = 2):
        """Triton compiler params for a compiled GPU-style kernel, None when interpreted.

        They must be passed: without compiler params this JAX lowers a GPU pallas_call through
        Mosaic GPU (`jax_pallas_use_mosaic_gpu` defaults to True), which the GPU-style kernels
        are not written for (no SMEM budget, no vector-indexed gathers).
        """
        if not self.compiled_for_gpu:
            return None
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def platform() -> str:
    return jax.default_backend()


def resolve(impl: str, interpret: Any = None) -> Backend:
    """Map an ``impl`` string (see module doc) to a kernel style and interpret setting.

    `interpret`, when given, overrides the automatic choice (e.g. ``True`` to interpret a
    GPU-style kernel on a GPU machine, or an ``InterpretParams`` for the TPU style).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    plat = platform()
    if impl == "auto":
        impl = "pallas" if plat in ("gpu", "tpu") else "xla"
    if impl == "xla":
        return Backend("xla")
    if impl == "pallas":
        kind = "tpu" if plat == "tpu" else "gpu"
    else:
        kind = impl.removeprefix("pallas_")
    if interpret is None:
        if kind == "gpu":
            interpret = plat != "gpu"
        else:
            if plat == "tpu":
                interpret = False
            else:
                from jax.experimental.pallas import tpu as pltpu

                interpret = pltpu.InterpretParams()
    return Backend(kind, interpret)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pow2_parts(width: int, minimum: int = 1) -> list[int]:
    """Power-of-two widths (each >= minimum, largest first) covering `width` with the least
    padding: Triton tiles must have power-of-two sizes, and its dot needs >= 16 per dim.
    576 -> [512, 64]; 24 -> [16, 8] (minimum 1) or [32] (minimum 16)."""
    width = round_up(width, minimum)
    parts = [1 << b for b in range(width.bit_length() - 1, -1, -1) if width >> b & 1]
    return parts if all(p >= minimum for p in parts) else [next_pow2(width)]


def split_last(x: jax.Array, widths: list[int]) -> list[jax.Array]:
    """x[..., :sum(widths)] cut into consecutive pieces of `widths` (zero-padded at the end)."""
    x = pad_axis(x, x.ndim - 1, max(sum(widths), x.shape[-1]))
    out, start = [], 0
    for w in widths:
        out.append(x[..., start:start + w])
        start += w
    return out


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad `x` along `axis` (at the end) to `size` with `value`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def default_segments(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    return segment_ids.astype(jnp.int32)


def query_positions(q_offset, batch: int, length: int) -> jax.Array:
    """Absolute position of every query, [B, T] int32: `q_offset` (scalar or [B]) + t."""
    offset = jnp.asarray(0 if q_offset is None else q_offset, jnp.int32)
    offset = jnp.broadcast_to(offset.reshape(-1, 1) if offset.ndim else offset, (batch, 1))
    return offset + jnp.arange(length, dtype=jnp.int32)[None, :]


def visibility_inputs(segment_ids, kv_segment_ids, q_offset, batch: int, length: int, keys: int):
    """(query segment ids, key segment ids, query positions) with the kernels' defaults filled in."""
    segment_ids = default_segments(segment_ids, batch, length)
    if kv_segment_ids is None:
        if keys != length:
            raise ValueError("kv_segment_ids is required when S != T")
        kv_segment_ids = segment_ids
    return segment_ids, kv_segment_ids.astype(jnp.int32), query_positions(q_offset, batch, length)


def last_position(q_pos: jax.Array) -> jax.Array:
    """The largest query position of a kernel block ([bt, 1] int32) as an int32 scalar, reduced
    in float32 (exact below 2^24): Mosaic's vector-to-scalar reductions are surest on floats."""
    return jnp.max(q_pos.astype(jnp.float32)).astype(jnp.int32)


def visibility(q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array, k_seg: jax.Array) -> jax.Array:
    """Causal + same-segment mask from per-query and per-key positions/segments.

    q_pos, q_seg: [..., Tq]; k_pos, k_seg: [..., Sk] -> bool [..., Tq, Sk].
    """
    return (k_pos[..., None, :] <= q_pos[..., :, None]) & (k_seg[..., None, :] == q_seg[..., :, None])
