"""Parallelism, independent of the model: meshes and logical-axis rules (`mesh`), expert-parallel
dispatch (`expert_parallel`), per-batch-shard custom calls (`per_shard`) and multi-process start-up
(`distributed`). Takes abstract params and logical axis names as inputs; never imports the model."""

from dsjax.parallel.mesh import (BATCH_AXES, MESH_AXES, MESH_PRESETS, RULES, active_mesh, batch_sharding, batch_shards,
                                 leaf_placer, make_mesh, mesh_sizes_from_config, multi_device_auto_mesh,
                                 param_shardings, physical_spec, place, place_batch, replicated, resolve_mesh_shape,
                                 shardings_for, state_shardings)

__all__ = ["BATCH_AXES", "MESH_AXES", "MESH_PRESETS", "RULES", "active_mesh", "batch_sharding", "batch_shards",
           "leaf_placer", "make_mesh", "mesh_sizes_from_config", "multi_device_auto_mesh", "param_shardings",
           "physical_spec", "place", "place_batch", "replicated", "resolve_mesh_shape", "shardings_for",
           "state_shardings"]
