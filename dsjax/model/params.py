"""Parameters with logical axis names, and the one linear layer every module uses.

Every parameter is created through `nn.with_logical_partitioning`, so `nn.get_partition_spec`
of an abstract (eval_shape) init gives each leaf's logical axes (`embed`, `heads`, `kv_lora`,
`q_lora`, `mlp`, `expert`, `vocab`, `layers`, ...); `dsjax.parallel` maps them onto a mesh.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def logical_param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
                  init=None, dtype=jnp.float32):
    """`module.param` whose metadata carries logical axis names (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"{module.name}/{name}: {len(axes)} axis names for shape {tuple(shape)}")
    init = init or nn.initializers.normal(stddev=0.02)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class Linear(nn.Module):
    """y = x . kernel, contracting the last `in_dims` axes of x; kernel is [*in, *features].

    Weights keep the structure of the math (e.g. `[q_lora, heads, head_dim]`) rather than a flat
    matrix, so each dimension has its own logical axis name for sharding.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names: the contracted input dims, then the output dims
    in_dims: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_dims:]
        kernel = logical_param(self, "kernel", (*in_shape, *self.features), self.axes,
                               nn.initializers.normal(self.init_std), jnp.dtype(self.param_dtype))
        return contract(x, kernel, self.in_dims, self.dtype)


def contract(x: jax.Array, kernel: jax.Array, in_dims: int, dtype, preferred=None) -> jax.Array:
    """Contract the last `in_dims` axes of x with the first `in_dims` axes of kernel."""
    dtype = jnp.dtype(dtype)
    dims = ((tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims))), ((), ()))
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), dims, preferred_element_type=preferred)


class Kernel(nn.Module):
    """A bare weight, `<name>/<param_name>`, for code that slices or reshapes it before use."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init_std: float = 0.02
    param_dtype: str = "float32"
    param_name: str = "kernel"

    @nn.compact
    def __call__(self) -> jax.Array:
        return logical_param(self, self.param_name, self.shape, self.axes, nn.initializers.normal(self.init_std),
                             jnp.dtype(self.param_dtype))
