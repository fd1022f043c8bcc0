"""Rotary position embeddings with YaRN frequencies, in DeepSeek's two layouts.

- MLA rotates *interleaved* pairs (x0, x1), (x2, x3), ... of its rope dims;
- the V3.2 lightning indexer rotates *half-split* pairs (x_j, x_{j + d/2}) of its first rope dims.

Both use the same per-pair frequencies. YaRN (arXiv 2309.00071) blends interpolated
(`1 / (factor * base^(2j/d))`) and original frequencies with a linear ramp between the
dimensions that complete `beta_fast` and `beta_slow` rotations over the original context.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _factor(rope_scaling: dict, max_position_embeddings: int) -> float:
    factor = rope_scaling.get("factor")
    if factor is None:  # HF's convention: the extension ratio of the context
        factor = max_position_embeddings / rope_scaling["original_max_position_embeddings"]
    return float(factor)


def inverse_frequencies(dim: int, theta: float, rope_scaling: dict | None, max_position_embeddings: int) -> np.ndarray:
    """The `dim // 2` rotation frequencies, float32."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    base_freqs = np.float32(theta) ** exponents
    extrapolation = 1.0 / base_freqs
    if rope_scaling is None:
        return extrapolation.astype(np.float32)
    factor = _factor(rope_scaling, max_position_embeddings)
    interpolation = 1.0 / (factor * base_freqs)
    original_len = rope_scaling["original_max_position_embeddings"]
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dim whose wavelength fits `num_rotations` times
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low (interpolated)
    return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


def attention_scaling(rope_scaling: dict | None, max_position_embeddings: int) -> tuple[float, float]:
    """(cos/sin magnitude factor, softmax-scale multiplier) for a rope config, as HF defines them.

    DeepSeek's configs set mscale = mscale_all_dim, so cos/sin stay unscaled and the softmax
    scale gains `yarn_get_mscale(factor, mscale_all_dim) ** 2`.
    """
    if rope_scaling is None:
        return 1.0, 1.0
    factor = _factor(rope_scaling, max_position_embeddings)
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    cos_sin_factor = rope_scaling.get("attention_factor")
    if cos_sin_factor is None:
        if mscale and mscale_all_dim:
            cos_sin_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            cos_sin_factor = yarn_get_mscale(factor)
    softmax_factor = yarn_get_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return float(cos_sin_factor), float(softmax_factor)


def rope_tables(positions: jax.Array, config) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [*positions.shape, qk_rope_head_dim // 2], float32."""
    inv_freq = inverse_frequencies(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling,
                                   config.max_position_embeddings)
    magnitude, _ = attention_scaling(config.rope_scaling, config.max_position_embeddings)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * magnitude, jnp.sin(angles) * magnitude


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotate the last dim of x ([B, T, d] or [B, T, H, d]) by per-token angles ([B, T, d/2])."""
    if x.ndim == cos.ndim + 1:  # a heads axis: every head uses the token's angles
        cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32)
    if interleaved:
        first, second = x32[..., 0::2], x32[..., 1::2]
    else:
        half = x.shape[-1] // 2
        first, second = x32[..., :half], x32[..., half:]
    rotated_first = first * cos - second * sin
    rotated_second = second * cos + first * sin
    if interleaved:
        out = jnp.stack([rotated_first, rotated_second], axis=-1).reshape(x.shape)
    else:
        out = jnp.concatenate([rotated_first, rotated_second], axis=-1)
    return out.astype(x.dtype)
