"""Meshes and logical-axis rules: how every parameter and activation is laid out over devices.

A mesh has up to four axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `expert` (routed experts split across devices; also data parallel for the
rest of the model) and `tensor` (heads / MLP width split). Absent axes have size 1, so one rule set
serves every layout; the presets only choose sizes:

    "fsdp":          {"fsdp": -1}
    "fsdp_expert":   {"fsdp": -1, "expert": 4}
    "expert_tensor": {"expert": -1, "tensor": 2}

-1 means "the remaining devices". A dimension that an axis size does not divide stays replicated.

Nothing here knows the model: parameter shardings are computed from a model's abstract params and
logical axis names (`dsjax.model.param_shardings` passes them in). Training builds its mesh from the
config's `mesh` section with `mesh_sizes_from_config` (there `data` takes whatever devices no axis
claims), creates params and optimizer state directly in their shards (`state_shardings`) and
assembles each global batch from the rows of every process (`place_batch`).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dsjax.tree import path_names

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


def mesh_sizes_from_config(mesh_config: Mapping[str, int | None] | str | None) -> dict[str, int]:
    """The axis sizes a training config's `mesh` section asks for (input of `make_mesh`).

    `mesh_config` is a preset name, or a mapping of axis sizes in which None means "not set"; the
    key `preset` (a preset name, "" for none) gives sizes that the other keys then override. Unset
    axes have size 1, except that `data` takes the remaining devices when no axis is -1; so `{}`
    is pure data parallelism over every device and `{"expert": 4}` is data x 4-way experts.
    """
    if mesh_config is None or isinstance(mesh_config, str):
        mesh_config = {"preset": mesh_config or ""}
    if hasattr(mesh_config, "to_dict"):
        mesh_config = mesh_config.to_dict()
    given = dict(mesh_config)
    preset = given.pop("preset", "") or ""
    if preset and preset not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {preset!r}; presets: {', '.join(MESH_PRESETS)}")
    sizes = dict(MESH_PRESETS[preset]) if preset else {}
    unknown = sorted(set(given) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {MESH_AXES} (or 'preset')")
    for axis, size in given.items():
        if size is None:
            continue
        if isinstance(size, bool) or int(size) != size or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r} must be a positive integer or -1 (the remaining devices)")
        if size == -1:
            sizes = {a: s for a, s in sizes.items() if s != -1}  # at most one -1: the explicit one
        sizes[axis] = int(size)
    if -1 not in sizes.values() and "data" not in sizes:
        sizes["data"] = -1
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


def param_shardings(shapes, axes, mesh: Mesh, rules=None):
    """A pytree like `shapes` (a model's abstract params) of NamedShardings, from `axes` (a like pytree of
    PartitionSpecs of logical axis names)."""
    return jax.tree_util.tree_map(lambda spec, leaf: NamedSharding(mesh, physical_spec(spec, leaf.shape, mesh, rules)),
                                  axes, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Inputs [batch, ...]: the batch split over the data-parallel axes."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts the batch dimension is split (product of the batch axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shardings_for(tree, model_shapes, model_shardings, mesh: Mesh):
    """Shardings for a pytree that may differ from a model's params: leaves found in the model (same
    dict path and shape as in `model_shapes`) get the model's sharding, any other leaf is replicated."""
    known = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(model_shapes)[0],
                                      jax.tree_util.tree_leaves(model_shardings)):
        known[path_names(path)] = (tuple(leaf.shape), sharding)

    def pick(path, leaf):
        shape, sharding = known.get(path_names(path), (None, None))
        return sharding if shape == tuple(leaf.shape) else replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(abstract_state, params_shardings, mesh: Mesh):
    """Shardings for a pytree holding params-shaped subtrees (optimizer state: Adam moments, ...).

    A leaf whose path ends in a parameter's path (dict keys) and has that parameter's shape gets the
    parameter's sharding; everything else (step counters, scalars) is replicated.
    """
    by_path = {path_names(path): sharding
               for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}

    def pick(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        tail = 0  # the trailing run of dict keys
        while tail < len(path) and isinstance(path[len(path) - 1 - tail], jax.tree_util.DictKey):
            tail += 1
        for start in range(len(path) - tail, len(path)):
            sharding = by_path.get(path_names(path[start:]))
            if sharding is not None and _fits(sharding, shape):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    for axes, dim in zip(spec, shape):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if dim % math.prod(sharding.mesh.shape[a] for a in axes):
            return False
    return True


def place(value, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array: each device receives only its
    slice, so a large leaf never lands whole on one device (works across processes)."""
    if isinstance(value, jax.Array):
        return jax.device_put(value, sharding)  # device_put reshards a global array as needed
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def leaf_placer(shardings):
    """`(path, host array) -> array` putting each leaf into its shards as it is read: `shardings` is a
    params-like pytree of NamedShardings (paths not in it are replicated). None: arrays stay as they are."""
    if shardings is None:
        return lambda path, value: value
    mesh = jax.tree_util.tree_leaves(shardings)[0].mesh
    by_path = {path_names(path): sharding for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    return lambda path, value: place(value, by_path.get(tuple(path)) or replicated(mesh))


def place_batch(batch, mesh: Mesh):
    """A global batch from this process's rows: `[rows, ...]` leaves become `[rows x processes, ...]`
    arrays split over the batch axes (`jax.make_array_from_process_local_data`). Leaves that already
    are global arrays are only resharded."""
    def one(leaf):
        ndim = np.ndim(leaf)
        sharding = batch_sharding(mesh, ndim) if ndim else replicated(mesh)
        if isinstance(leaf, jax.Array) and (not leaf.is_fully_addressable or jax.process_count() == 1):
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(one, batch)


def active_mesh():
    """The mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def multi_device_auto_mesh():
    """The active mesh when it has more than one device and only Auto axes, else None."""
    mesh = active_mesh()
    if mesh is None or mesh.size == 1 or any(axis_type != AxisType.Auto for axis_type in mesh.axis_types):
        return None
    return mesh
