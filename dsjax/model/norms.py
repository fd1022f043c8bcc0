"""RMSNorm (everywhere in the model) and LayerNorm (the V3.2 indexer's key norm).

Both normalise in float32 and return the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.params import logical_param


class RMSNorm(nn.Module):
    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones,
                              jnp.dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-6
    axis_name: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = logical_param(self, "scale", (dim,), (self.axis_name,), nn.initializers.ones, jnp.dtype(self.param_dtype))
        bias = logical_param(self, "bias", (dim,), (self.axis_name,), nn.initializers.zeros, jnp.dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
