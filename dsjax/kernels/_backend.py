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


def visibility(q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array, k_seg: jax.Array) -> jax.Array:
    """Causal + same-segment mask from per-query and per-key positions/segments.

    q_pos, q_seg: [..., Tq]; k_pos, k_seg: [..., Sk] -> bool [..., Tq, Sk].
    """
    return (k_pos[..., None, :] <= q_pos[..., :, None]) & (k_seg[..., None, :] == q_seg[..., :, None])
