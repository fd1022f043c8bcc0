"""Meshes and logical-axis rules: how every parameter and activation is laid out over devices.

A mesh has up to four axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `expert` (routed experts split across devices; also data parallel for the
rest of the model) and `tensor` (heads / MLP width split). Absent axes have size 1, so one rule set
serves every layout; the presets only choose sizes:

    "fsdp":          {"fsdp": -1}
    "fsdp_expert":   {"fsdp": -1, "expert": 4}
    "expert_tensor": {"expert": -1, "tensor": 2}

-1 means "the remaining devices". A dimension that an axis size does not divide stays replicated.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis name -> mesh axes (None: replicated)
RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    # Dense weights shard over every data-parallel axis that holds state (ZeRO-3 style); expert
    # weights use `expert` for their expert dim, so their embed dim gets `fsdp` only.
    "embed": ("fsdp", "expert"),
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "index_heads": "tensor",
    "q_lora": ("fsdp", "expert"),  # q_b_proj / kv_b_proj have no embed dim: shard their latent side
    "kv_lora": ("fsdp", "expert"),
    "head_dim": None,
    "index_head_dim": None,
    "concat_embed": None,
    "layers": None,
    "length": None,
}

MESH_PRESETS = {
    "single": {},
    "fsdp": {"fsdp": -1},
    "fsdp_expert": {"fsdp": -1, "expert": 4},
    "expert_tensor": {"expert": -1, "tensor": 2},
}


def resolve_mesh_shape(mesh_config: Mapping[str, int] | str | None, num_devices: int) -> dict[str, int]:
    """Axis sizes for all four axes, with one -1 filled in; errors name the bad axis."""
    if isinstance(mesh_config, str):
        if mesh_config not in MESH_PRESETS:
            raise ValueError(f"unknown mesh preset {mesh_config!r}; presets: {', '.join(MESH_PRESETS)}")
        mesh_config = MESH_PRESETS[mesh_config]
    sizes = {axis: 1 for axis in MESH_AXES}
    given = dict(mesh_config or {})
    unknown = sorted(set(given) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {MESH_AXES}")
    free = [axis for axis, size in given.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    for axis, size in given.items():
        if size != -1:
            if int(size) < 1:
                raise ValueError(f"mesh.{axis}={size} must be a positive size or -1")
            sizes[axis] = int(size)
    fixed = math.prod(sizes[a] for a in MESH_AXES if a not in free)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {given}: {num_devices} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but {num_devices} are available")
    return sizes


def make_mesh(mesh_config=None, devices=None) -> Mesh:
    """A mesh with the four named axes (Auto axis types: XLA propagates shardings)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def physical_spec(logical: PartitionSpec | tuple, shape: tuple[int, ...], mesh: Mesh, rules=None) -> PartitionSpec:
    """Map a spec of logical names onto mesh axes, replicating dims an axis size does not divide."""
    rules = RULES if rules is None else rules
    out, used = [], set()
    for name, dim in zip(tuple(logical), shape):
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            axes = tuple(a for a in axes if dim % mesh.shape[a] == 0)[:1]  # keep what divides
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_shardings(config, mesh: Mesh, rules=None):
    """A pytree like params of NamedShardings (from the parameters' logical axis names)."""
    from dsjax.model.transformer import abstract_params, logical_axes

    shapes = abstract_params(config)
    specs = logical_axes(config)
    return jax.tree_util.tree_map(lambda spec, leaf: NamedSharding(mesh, physical_spec(spec, leaf.shape, mesh, rules)),
                                  specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded_params(config, mesh: Mesh, rng, rules=None):
    """Random parameters created directly in their shards: no host ever holds the whole model."""
    from dsjax.model.transformer import init_params

    shardings = param_shardings(config, mesh, rules)
    with jax.set_mesh(mesh):
        return jax.jit(lambda key: init_params(config, key), out_shardings=shardings)(rng)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Inputs [batch, ...]: the batch split over the data-parallel axes."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def active_mesh():
    """The mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh
