"""The on-disk layouts dsjax reads besides HF directories, and how their model config is found.

A converted checkpoint (`python -m dsjax.convert hf-to-orbax`)::

    OUT/
      params/                    Orbax PyTree checkpoint of the dsjax param tree (restores with
                                 `ocp.StandardCheckpointer().restore(OUT / "params")`)
      fp8_scales/                only with --keep_fp8: Orbax PyTree checkpoint, one float32 leaf per
                                 FP8 kernel of params/, at the same path (see below)
      dsjax_model_config.json    the dsjax model config (`dsjax.make_config(json.load(...))`)
      dsjax_checkpoint.json      what was converted: source, dtypes, FP8 leaves and block size, counts
      config.json                the same model as an HF config.json (for tools that look for one)

FP8-kept kernels are stored in the dsjax layout `[*stack, *in, *out]` as float8_e4m3fn; viewing a
slice as the matrix `[in, out]`, its scale has shape `[ceil(in / 128), ceil(out / 128)]` and
`W[i, o] = q[i, o] * scale[i // 128, o // 128]` (the transpose of HF's `weight_scale_inv`).

A training run (`dsjax.checkpoint.Checkpointer`): `WORKDIR/checkpoints/<step>/state/` holds
the train state with the params under `params`, `<step>/config/` the run config (JSON). The model
config is the run config's `model` entry (a dict of model fields, optionally with a `preset`/`name`,
a preset name, or "hf" with `init_from`) plus its `model_overrides`, or the run config itself when
it is a model config; the number of MTP modules is what the saved params hold.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np

from dsjax.hf.checkpoint import CheckpointFormatError
from dsjax.hf.names import leaf_maps
from dsjax.model.config import make_config
from dsjax.model.transformer import param_shardings
from dsjax.parallel.mesh import leaf_placer

PARAMS_ITEM = "params"
SCALES_ITEM = "fp8_scales"
MODEL_CONFIG_FILE = "dsjax_model_config.json"
INFO_FILE = "dsjax_checkpoint.json"
FORMAT_NAME = "dsjax-orbax-params"
FORMAT_VERSION = 1
_F32_LEAVES = ("e_score_correction_bias",)  # kept in float32 whatever the param dtype


def np_dtype(name) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)


def leaf_dtype(path, param_dtype) -> np.dtype:
    return np.dtype(np.float32) if path[-1] in _F32_LEAVES else np_dtype(param_dtype)


def _is_training_run(path: str) -> bool:
    """A step dir (has state/), a workdir (has checkpoints/) or a checkpoints dir (has <step>/state/).
    Checked with the file system only: `dsjax.load` on an HF directory does not import Orbax."""
    if os.path.isdir(os.path.join(path, "state")) or os.path.isdir(os.path.join(path, "checkpoints")):
        return True
    return any(name.isdigit() and os.path.isdir(os.path.join(path, name, "state")) for name in os.listdir(path))


def checkpoint_kind(path: str) -> str:
    """'orbax' (a converted checkpoint), 'train' (a training run or one of its steps) or 'hf'."""
    if os.path.isfile(os.path.join(path, PARAMS_ITEM, "_METADATA")):
        if not os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)):
            raise CheckpointFormatError(f"{path}: has an Orbax params/ item but no {MODEL_CONFIG_FILE}; "
                                        "was it written by `python -m dsjax.convert hf-to-orbax`?")
        return "orbax"
    if _is_training_run(path):
        return "train"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ValueError(f"{path}: not a checkpoint directory dsjax can read: no config.json (HF checkpoint), "
                     f"no {PARAMS_ITEM}/ (dsjax Orbax checkpoint), no state/ or checkpoints/ (training run)")


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def config_from_spec(spec: str, **overrides) -> ml_collections.ConfigDict:
    """A model config from a preset name, an HF config.json, or a dsjax model config JSON file."""
    if os.path.isdir(spec):
        for name in (MODEL_CONFIG_FILE, "config.json"):
            if os.path.isfile(os.path.join(spec, name)):
                return config_from_spec(os.path.join(spec, name), **overrides)
        raise FileNotFoundError(f"{spec}: no {MODEL_CONFIG_FILE} or config.json in this directory")
    if os.path.isfile(spec):
        data = read_json(spec)
        if isinstance(data, dict) and "model_type" in data:
            from dsjax.hf.config import from_hf  # noqa: PLC0415

            return from_hf(data, source=spec, **overrides)
        return model_config_from_run_config(data, spec, **overrides)
    return make_config(spec, **overrides)


def model_config_from_run_config(run: Any, source: str, **overrides) -> ml_collections.ConfigDict:
    """The model config inside a saved run config (see the module docstring for the accepted forms).

    Follows `dsjax.train.config.model_config_from`: `model` is a preset name, a dict of model fields
    (optionally with `preset`/`name`), or "hf" (the HF checkpoint at `init_from`), and
    `model_overrides` are applied on top."""
    candidate = run
    if isinstance(run, dict):
        for key in ("model", "model_config"):
            if key in run:
                candidate = run[key]
                overrides = {**dict(run.get("model_overrides") or {}), **overrides}
                break
    try:
        if candidate == "hf":
            from dsjax.hf.config import from_hf, read_hf_config  # noqa: PLC0415

            path = run.get("init_from") if isinstance(run, dict) else None
            if not path:
                raise CheckpointFormatError(f"{source}: model='hf' but the run config has no init_from")
            return from_hf(read_hf_config(path), source=os.path.join(path, "config.json"), **overrides)
        if isinstance(candidate, str):
            return make_config(candidate, **overrides)
        if isinstance(candidate, dict):
            fields = dict(candidate)
            preset = fields.pop("preset", None) or fields.pop("name", None)
            return make_config(preset, **{**fields, **overrides}) if preset else make_config(fields, **overrides)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{source}: the saved run config does not describe a dsjax model ({e})") from None
    raise CheckpointFormatError(f"{source}: the saved run config has no model config "
                                f"(expected a 'model' entry, got {type(candidate).__name__})")


class ParamsSource:
    """The params of a converted or training checkpoint, with its model config; read lazily."""

    def __init__(self, path: str, model_config: str | None = None, **overrides):
        from dsjax.convert.orbax_stream import OrbaxArrays  # noqa: PLC0415

        self.path = os.path.abspath(path)
        self.kind = checkpoint_kind(self.path)
        self.fp8_block: tuple[int, int] = (128, 128)
        self.scales = None
        if self.kind == "hf":
            raise ValueError(f"{path}: this is an HF checkpoint directory, not an Orbax one "
                             "(convert it with `python -m dsjax.convert hf-to-orbax`)")
        if self.kind == "orbax":
            self.step_dir = self.path
            self.arrays = OrbaxArrays(os.path.join(self.path, PARAMS_ITEM))
            self.prefix: tuple[str, ...] = ()
            info_path = os.path.join(self.path, INFO_FILE)
            info = read_json(info_path) if os.path.isfile(info_path) else {}
            fp8 = info.get("fp8") or {}
            if os.path.isdir(os.path.join(self.path, SCALES_ITEM)):
                self.scales = OrbaxArrays(os.path.join(self.path, SCALES_ITEM))
                self.fp8_block = tuple(fp8.get("block_size", self.fp8_block))
            saved = read_json(os.path.join(self.path, MODEL_CONFIG_FILE))
            self.config = (config_from_spec(model_config, **overrides) if model_config
                           else model_config_from_run_config(saved, os.path.join(self.path, MODEL_CONFIG_FILE),
                                                             **overrides))
            self.description = f"converted checkpoint {self.path}"
        else:
            from dsjax import checkpoint as train_ckpt  # noqa: PLC0415
            from etils import epath  # noqa: PLC0415

            self.step_dir = str(train_ckpt._resolve_step_dir(epath.Path(self.path)))  # noqa: SLF001
            self.arrays = OrbaxArrays(os.path.join(self.step_dir, train_ckpt.STATE_ITEM))
            self.prefix = ("params",)
            if not any(p[:1] == self.prefix for p in self.arrays.leaves):
                raise CheckpointFormatError(f"{self.step_dir}: the saved train state has no 'params' entry")
            if model_config:
                self.config = config_from_spec(model_config, **overrides)
            else:
                config_dir = os.path.join(self.step_dir, train_ckpt.CONFIG_ITEM)
                if not os.path.isdir(config_dir):
                    raise CheckpointFormatError(
                        f"{self.step_dir}: no saved run config ({train_ckpt.CONFIG_ITEM}/ item), so the model "
                        "config is unknown; pass it explicitly (--model_config PRESET|config.json|"
                        f"{MODEL_CONFIG_FILE})")
                import orbax.checkpoint as ocp  # noqa: PLC0415

                run = ocp.JsonCheckpointHandler().restore(epath.Path(config_dir))
                self.config = model_config_from_run_config(run, config_dir, **overrides)
            mtp = sum(1 for p in self.param_paths() if p[0].startswith("mtp_") and p[1:] == ("eh_proj", "kernel"))
            if "num_mtp_layers" not in overrides and mtp != self.config.num_mtp_layers:
                self.config.num_mtp_layers = mtp  # what the run actually trained
            self.description = f"training checkpoint {self.step_dir}"
        self.check_structure()

    # ---------------------------------------------------------------- params
    def param_paths(self) -> list[tuple[str, ...]]:
        n = len(self.prefix)
        return [p[n:] for p in self.arrays.leaves if p[:n] == self.prefix]

    def full(self, path) -> tuple[str, ...]:
        return self.prefix + tuple(path)

    def shape(self, path):
        return self.arrays.shape(self.full(path))

    def dtype(self, path):
        return self.arrays.dtype(self.full(path))

    def is_fp8(self, path) -> bool:
        return self.dtype(path) in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))

    def check_structure(self) -> None:
        """Every parameter of the config present with its shape, and nothing else."""
        maps = leaf_maps(self.config)
        have = set(self.param_paths())
        want = {m.path: m.stack_shape + m.slice_shape for m in maps}
        # MTP modules beyond the config's count (e.g. loaded with num_mtp_layers=0) are left unread.
        have = {p for p in have if not (p[0].startswith("mtp_") and p[0][4:].isdigit()
                                        and int(p[0][4:]) >= self.config.num_mtp_layers)}
        missing = sorted("/".join(p) for p in set(want) - have)
        extra = sorted("/".join(p) for p in have - set(want))
        if missing or extra:
            raise CheckpointFormatError(
                f"{self.description}: its params do not match the model config: "
                + (f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else ""))
        for path, shape in want.items():
            if self.shape(path) != tuple(shape):
                raise CheckpointFormatError(f"{self.description}: param {'/'.join(path)} has shape {self.shape(path)}, "
                                            f"the model config implies {tuple(shape)}")
            if self.is_fp8(path):
                if self.scales is None or tuple(path) not in self.scales.leaves:
                    raise CheckpointFormatError(f"{self.description}: param {'/'.join(path)} is FP8 but has no scales "
                                                f"in {SCALES_ITEM}/")


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path):
    for key in path:
        tree = tree[key]
    return tree


def load_orbax_params(path: str, mesh=None, **overrides):
    """(model config, params as numpy) of a converted checkpoint or a training checkpoint.

    The params item is restored with standard Orbax (`StandardCheckpointer`, or
    `dsjax.checkpoint.restore_params` for training runs); FP8 kernels are dequantised with
    their scales; leaves are cast to the config's `param_dtype` (router biases stay float32).
    `mesh`: place each finished leaf onto this mesh (`dsjax.model.param_shardings`)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415

    from dsjax.convert.fp8 import dequantize_leaf  # noqa: PLC0415
    from dsjax.checkpoint import restore_params  # noqa: PLC0415

    source = ParamsSource(path, **overrides)
    config = source.config
    place = leaf_placer(None if mesh is None else param_shardings(config, mesh))
    if source.kind == "orbax":
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(epath.Path(source.path) / PARAMS_ITEM)
        scales = None
        if source.scales is not None:
            with ocp.StandardCheckpointer() as checkpointer:
                scales = checkpointer.restore(epath.Path(source.path) / SCALES_ITEM)
    else:
        restored = restore_params(source.step_dir)
        scales = None
    params: dict = {}
    for leaf in leaf_maps(config):
        value = np.asarray(_get(restored, leaf.path))
        if source.is_fp8(leaf.path):
            value = dequantize_leaf(leaf, value, np.asarray(_get(scales, leaf.path)), source.fp8_block)
        value = value.astype(leaf_dtype(leaf.path, config.param_dtype), copy=False)
        _set(params, leaf.path, place(leaf.path, value))
    return config, params
