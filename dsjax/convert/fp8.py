"""Block-wise FP8 (DeepSeek's 128x128 `weight_scale_inv` format) in both layouts.

HF stores a Linear as `q` [out, in] (float8_e4m3fn) plus `scale_inv` [ceil(out/bo), ceil(in/bi)]
(float32) with `W[i, j] = q[i, j] * scale_inv[i // bo, j // bi]`; edge blocks may be partial.
dsjax kernels are `[*in, *out]`; an FP8-kept dsjax checkpoint stores the kernel in that layout and
the scales transposed to match, `[ceil(in/bi), ceil(out/bo)]` per slice (see `dsjax.convert`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dsjax.hf.checkpoint import dequantize_fp8

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_DTYPES = (E4M3, np.dtype(ml_dtypes.float8_e5m2))


def _block_starts(size: int, block: int) -> np.ndarray:
    return np.arange(0, size, block)


def quantize_fp8(weight: np.ndarray, block=(128, 128), dtype=E4M3, scale_fmt: str | None = None):
    """HF-layout weight [out, in] -> (q [out, in] FP8, scale_inv [ceil(out/bo), ceil(in/bi)] float32).

    Each block's scale maps its largest magnitude onto the format's largest finite value
    (448 for E4M3); `scale_fmt="ue8m0"` rounds scales up to powers of two (V3.1/V3.2 style).
    All-zero blocks get scale 1."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_fp8 needs a matrix, got shape {w.shape}")
    rows, cols = w.shape
    block_rows, block_cols = block
    dtype = np.dtype(dtype)
    fmax = float(ml_dtypes.finfo(dtype).max)
    amax = np.maximum.reduceat(np.abs(w), _block_starts(rows, block_rows), axis=0)
    amax = np.maximum.reduceat(amax, _block_starts(cols, block_cols), axis=1)
    with np.errstate(divide="ignore"):
        scale = amax / np.float32(fmax)
        if scale_fmt == "ue8m0":
            scale = np.exp2(np.ceil(np.log2(scale)))
    scale = np.where(amax > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.empty((rows, cols), dtype)
    for b in range(scale.shape[0]):
        band = slice(b * block_rows, (b + 1) * block_rows)
        divisor = np.repeat(scale[b], block_cols)[:cols]
        q[band] = np.clip(w[band] / divisor, -fmax, fmax).astype(dtype)
    return q, scale


def dequantize_kernel(leaf, q: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """One dsjax-layout FP8 kernel slice (leaf.slice_shape) and its dsjax-layout scale -> float32."""
    return leaf.to_dsjax(dequantize_fp8(leaf.to_hf(q), np.ascontiguousarray(scale.T), block))


def dequantize_leaf(leaf, q: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """A whole stacked dsjax FP8 kernel [*stack, *slice] and its scales [*stack, nbi, nbo] -> float32."""
    out = np.empty(q.shape, np.float32)
    for index in np.ndindex(*leaf.stack_shape):
        out[index] = dequantize_kernel(leaf, q[index], scale[index], block)
    return out


def has_nan_fp8(q: np.ndarray) -> bool:
    """E4M3FN has no infinities; its NaN is the bit pattern S.1111.111. E5M2 has both."""
    bits = q.view(np.uint8)
    if q.dtype == E4M3:
        return bool(np.any((bits & 0x7F) == 0x7F))
    return bool(np.any((bits & 0x7C) == 0x7C))


def all_finite(array: np.ndarray, chunk: int = 1 << 22) -> bool:
    """No NaN/inf (FP8, bfloat16 or IEEE floats), checked in pieces: no array-sized temporaries."""
    flat = np.ascontiguousarray(array).reshape(-1)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        if array.dtype in FP8_DTYPES:
            if has_nan_fp8(part):
                return False
        elif array.dtype == bf16:  # all-ones exponent: inf or NaN
            if np.any((part.view(np.uint16) & 0x7F80) == 0x7F80):
                return False
        elif not np.isfinite(part).all():
            return False
    return True
