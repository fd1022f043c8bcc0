"""Reading any checkpoint dsjax knows into (model config, params): `dsjax.load` and the training
loop's `init_from` both start here."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from dsjax.hf.checkpoint import check_names, check_tensors, fp8_format, load_params, resolve_mtp_layers
from dsjax.hf.config import from_hf, read_hf_config
from dsjax.hf.names import leaf_maps
from dsjax.hf.safetensors_io import CheckpointReader
from dsjax.parallel.mesh import make_mesh, mesh_sizes_from_config


def as_mesh(mesh: Any) -> jax.sharding.Mesh | None:
    """A `jax.sharding.Mesh` as it is; axis sizes or a preset name (as in a training config's `mesh`)
    made into one; None stays None."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    return make_mesh(mesh_sizes_from_config(mesh))


def read_checkpoint(path: str, mesh: Any = None, **overrides) -> tuple[Any, dict]:
    """(model config, params) of a checkpoint directory. `path` may be

    - an HF checkpoint (config.json + *.safetensors, official DeepSeek names; bf16/fp32, or FP8 with
      block scales, dequantised on load);
    - an Orbax checkpoint written by `python -m dsjax.convert hf-to-orbax` (FP8-kept ones are
      dequantised with their scales);
    - a training run: its workdir, `WORKDIR/checkpoints`, or a step dir `WORKDIR/checkpoints/<step>`
      (the latest complete step unless a step dir is given; the model config comes from the run
      config saved with the checkpoint).

    `mesh` (a `jax.sharding.Mesh`, axis sizes or a preset name, see `as_mesh`): each parameter is
    put into its shards (`dsjax.model.param_shardings`) as it is read, so no device ever holds the
    whole model. None: the params are plain device arrays.

    `overrides` set model config fields, e.g. `dtype="bfloat16"`; `param_dtype` also casts the
    loaded parameters."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    from dsjax.convert import layout  # noqa: PLC0415 (orbax is imported only when needed)

    mesh = as_mesh(mesh)
    if layout.checkpoint_kind(path) != "hf":
        config, params = layout.load_orbax_params(path, mesh=mesh, **overrides)
    else:
        hf_config = read_hf_config(path)
        config_path = os.path.join(path, "config.json")
        config = from_hf(hf_config, source=config_path, **overrides)
        fp8 = fp8_format(hf_config, config_path)
        reader = CheckpointReader(path)
        resolve_mtp_layers(reader, config, hf_config, explicit="num_mtp_layers" in overrides)
        maps = leaf_maps(config)
        check_names(reader, config, maps)
        check_tensors(reader, maps, fp8, config_path)
        params = load_params(reader, config, fp8=fp8, mesh=mesh)
    if mesh is None:
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return config, params
