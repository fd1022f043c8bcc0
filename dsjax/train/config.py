"""Training configs: every key the loop, the optimizer and the shipped recipes read, with its
default (:func:`default_train_config`, :func:`default_optimizer_config`), the one way to read a
key (:func:`get`), the checks, and the model config and device mesh a config describes.

A config may be a ``ml_collections.ConfigDict``, a plain dict or any object with attributes; a
missing key reads as its default.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from dsjax import parallel
from dsjax.data import default_data_config
from dsjax.model.config import make_config
from dsjax.model.dsa import DSA_STAGES
from dsjax.tree import config_get

__all__ = [
    "SCHEDULES",
    "WSD_DECAY_SHAPES",
    "TRAIN_DSA_STAGES",
    "default_train_config",
    "default_optimizer_config",
    "get",
    "as_dict",
    "validate_train_config",
    "validate_optimizer_config",
    "wsd_decay_start",
    "model_config_from",
    "run_mesh",
    "to_json",
]

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "warmup_cosine", "wsd")
WSD_DECAY_SHAPES = ("linear", "sqrt")
# The model's DSA stages as a training config writes them: "" for None (the model's own attention).
TRAIN_DSA_STAGES = tuple("" if stage is None else stage for stage in DSA_STAGES)


# --------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------


def default_train_config() -> ml_collections.ConfigDict:
    """Every key of a training config, with its default.

    Keys:
      recipe: what the run trains and on what (:mod:`dsjax.recipes`): "pretrain"
        (LM + MTP + balance loss on ``data``) or "dsa" (a DeepSeek Sparse
        Attention stage, ``dsa.stage``).
      model: a preset name (str) or a ConfigDict of model fields (the default: all
        fields of ``tiny_v3``, so ``--config.model.FIELD=...`` works on the
        command line); the string "hf" reads the fields from ``init_from``'s
        HF ``config.json``.
      model_overrides: model fields set on top of ``model``.
      init_from: "" (random init), an HF checkpoint directory (``config.json`` +
        safetensors) or a dsjax workdir / step directory whose params start the
        run. Only used when the workdir has no checkpoint yet.
      seed: init, per-step rng and data order.
      num_steps: optimizer steps to reach (a resumed run continues up to it).
      batch_size: rows per optimizer step (split into
        ``optimizer.accumulation_steps`` micro-batches).
      seq_len: tokens per row.
      log_every: steps between console / metrics.jsonl / TensorBoard entries
        (the first step and the last are logged too).
      checkpoint_every: steps between checkpoints (the last step is saved too).
      keep_checkpoints: newest checkpoints kept (0: all).
      async_checkpointing: write checkpoints in a background thread.
      tensorboard: write TensorBoard event files to ``WORKDIR/tensorboard``.
      mtp_loss_weight: weight of the mean MTP cross-entropy (V3: 0.3, later 0.1).
      balance_loss_alpha: weight of the summed sequence-wise balance loss (1e-4).
      router_bias_update_rate: gamma of the aux-loss-free bias update (1e-3; 0
        off); recipes that freeze the router biases turn it off themselves.
      dsa: DeepSeek Sparse Attention (V3.2 models; see :mod:`dsjax.recipes.dsa`):
        stage: "" (the model's own attention: top-k sparse with an indexer) or
          "dense" (dense attention, indexer unused) with the "pretrain" recipe;
          "warmup" (dense attention, only the indexer trained, by KL to the
          attention distribution) or "sparse" (top-k attention, LM loss for
          the model, detached KL for the indexer) with the "dsa" recipe;
        indexer_loss_weight: weight of ``indexer_kl`` in the loss;
        dense_pretrain_steps: for "dsa" runs that start from nothing (empty
          workdir, no ``init_from``): dense pre-training steps run first in
          ``WORKDIR/dense_pretrain`` so the attention the indexer learns from
          is not uniform (0: none).
      mesh: the device mesh (axes ``data``, ``fsdp``, ``expert``, ``tensor``;
        see :mod:`dsjax.parallel`): axis sizes, None for unset, -1 (at most
        one axis) for the remaining devices; ``preset`` names a preset
        ("fsdp", "fsdp_expert", "expert_tensor") whose sizes the other keys
        override. Unset axes are 1, except that ``data`` takes the remaining
        devices when no axis is -1. The default (nothing set) is plain data
        parallelism over every device (one device: as before), or over as many
        as a micro-batch splits evenly over (with a warning);
        ``--config.mesh.fsdp=-1 --config.mesh.expert=4``: experts split 4 ways,
        everything else FSDP-sharded over the rest; in a config file
        ``config.mesh.preset = "fsdp_expert"`` (a plain-dict config may hold a
        preset name or a dict of sizes). ``batch_size`` must divide by
        ``accumulation_steps`` times the batch shards (data x fsdp x expert).
      data: :func:`dsjax.data.default_data_config`.
      optimizer: :func:`default_optimizer_config`.
    """
    c = ml_collections.ConfigDict()
    c.recipe = "pretrain"
    c.model = make_config("tiny_v3")
    c.model_overrides = ml_collections.ConfigDict()
    c.init_from = ""
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 8
    c.seq_len = 256
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.tensorboard = True
    c.mtp_loss_weight = 0.3
    c.balance_loss_alpha = 1e-4
    c.router_bias_update_rate = 1e-3
    c.dsa = ml_collections.ConfigDict(dict(stage="", indexer_loss_weight=1.0, dense_pretrain_steps=0))
    c.mesh = ml_collections.ConfigDict(dict(preset="", **{axis: ml_collections.config_dict.placeholder(int)
                                                            for axis in parallel.MESH_AXES}))
    c.data = default_data_config()
    c.optimizer = default_optimizer_config()
    return c


def default_optimizer_config() -> ml_collections.ConfigDict:
    """Reference optimizer hyper-parameters of DeepSeek-V3 (see :mod:`dsjax.train.optim`).

    Keys:
      learning_rate: peak learning rate.
      b1, b2, eps: Adam hyper-parameters.
      weight_decay: decoupled (AdamW) weight decay, applied to ``kernel`` and
        ``embedding`` leaves only.
      grad_clip: maximum global gradient norm; 0 or None disables clipping.
      schedule: one of "constant", "warmup_cosine", "wsd".
      warmup_steps: linear warm-up length (from 0 to ``learning_rate``).
      decay_steps: step at which the decayed schedules reach their final value.
      final_lr_ratio: final learning rate as a fraction of ``learning_rate``.
      wsd_decay_fraction: fraction of ``decay_steps`` used by the WSD decay.
      wsd_decay_shape: "linear" or "sqrt" (1 - sqrt) WSD decay.
      accumulation_steps: micro-batches per optimizer step; the train step
        (:mod:`dsjax.train.step`) accumulates their gradients.
    """
    cfg = ml_collections.ConfigDict()
    cfg.learning_rate = 2.2e-4
    cfg.b1 = 0.9
    cfg.b2 = 0.95
    cfg.eps = 1e-8
    cfg.weight_decay = 0.1
    cfg.grad_clip = 1.0
    cfg.schedule = "warmup_cosine"
    cfg.warmup_steps = 2000
    cfg.decay_steps = 100000
    cfg.final_lr_ratio = 0.1
    cfg.wsd_decay_fraction = 0.2
    cfg.wsd_decay_shape = "linear"
    cfg.accumulation_steps = 1
    return cfg


# --------------------------------------------------------------------------
# Reading keys
# --------------------------------------------------------------------------


def get(config: Any, key: str, defaults: Callable[[], Any] = default_train_config) -> Any:
    """``config[key]`` (a ConfigDict or mapping; an object's attribute), else ``defaults()[key]``.

    The one reader of config keys: ``get(config, "num_steps")``,
    ``get(opt_cfg, "eps", default_optimizer_config)``.
    """
    try:
        return config_get(config, key)
    except KeyError:
        return defaults()[key]


def as_dict(x: Any) -> dict:
    """A sub-config (ConfigDict, mapping or None) as a plain dict."""
    if x is None:
        return {}
    if isinstance(x, ml_collections.ConfigDict):
        return x.to_dict()
    return dict(x)


def to_json(config: Any) -> dict:
    """The config as the JSON object saved with the run (tuples become lists, ...)."""
    as_plain = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(as_plain, default=str))


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_train_config(config: Any) -> None:
    """Raises ValueError naming the first bad key (``config.<key>=<value>: why``)."""

    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ValueError(f"config.{key}={get(config, key)!r}: {why}")

    need(isinstance(get(config, "recipe"), str) and get(config, "recipe"), "recipe", "must name a recipe")
    for key in ("num_steps", "batch_size", "seq_len", "log_every", "checkpoint_every"):
        lowest = 0 if key == "num_steps" else 1
        need(_is_int(get(config, key)) and get(config, key) >= lowest, key, f"must be an integer >= {lowest}")
    need(get(config, "seq_len") >= 2, "seq_len", "must be >= 2")
    keep = get(config, "keep_checkpoints")
    need(keep is None or (_is_int(keep) and keep >= 0), "keep_checkpoints", "must be an integer >= 0 (0: keep all)")
    for key in ("mtp_loss_weight", "balance_loss_alpha", "router_bias_update_rate"):
        value = get(config, key)
        need(_is_number(value) and math.isfinite(value) and value >= 0, key, "must be a finite number >= 0")
    dsa = as_dict(get(config, "dsa"))
    need(dsa.get("stage", "") in TRAIN_DSA_STAGES, "dsa", f"dsa.stage must be one of {TRAIN_DSA_STAGES}")
    steps = dsa.get("dense_pretrain_steps", 0)
    need(_is_int(steps) and steps >= 0, "dsa", "dsa.dense_pretrain_steps must be an integer >= 0")
    mesh = get(config, "mesh")
    try:
        parallel.mesh_sizes_from_config(mesh)
    except (ValueError, TypeError) as e:
        given = mesh if isinstance(mesh, str) else {k: v for k, v in as_dict(mesh).items() if v not in (None, "")}
        raise ValueError(f"config.mesh={given!r}: {e}") from None
    k = validate_optimizer_config(get(config, "optimizer"))["accumulation_steps"]
    need(get(config, "batch_size") % k == 0, "batch_size",
         f"must be divisible by optimizer.accumulation_steps={k} (micro-batches per step)")


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"optimizer.{key}={value!r}: {why}")


def _float_in(cfg, key, *, lo=None, hi=None, hi_open=False) -> float:
    value = get(cfg, key, default_optimizer_config)
    if not _is_number(value) or not math.isfinite(value):
        raise _bad(key, value, "must be a finite number")
    if lo is not None and value < lo:
        raise _bad(key, value, f"must be >= {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise _bad(key, value, f"must be {'<' if hi_open else '<='} {hi}")
    return float(value)


def _int_from(cfg, key, *, lo) -> int:
    value = get(cfg, key, default_optimizer_config)
    if not _is_int(value):
        raise _bad(key, value, "must be an integer")
    if value < lo:
        raise _bad(key, value, f"must be >= {lo}")
    return int(value)


def validate_optimizer_config(opt_cfg: Any) -> dict[str, Any]:
    """Checks the optimizer config; returns a plain dict of all keys (missing ones: their default).

    Raises:
      ValueError: naming the offending ``optimizer.<key>``.
    """
    out: dict[str, Any] = {}
    out["learning_rate"] = _float_in(opt_cfg, "learning_rate", lo=0.0)
    out["b1"] = _float_in(opt_cfg, "b1", lo=0.0, hi=1.0, hi_open=True)
    out["b2"] = _float_in(opt_cfg, "b2", lo=0.0, hi=1.0, hi_open=True)
    out["eps"] = _float_in(opt_cfg, "eps", lo=0.0)
    out["weight_decay"] = _float_in(opt_cfg, "weight_decay", lo=0.0)
    clip = get(opt_cfg, "grad_clip", default_optimizer_config)
    out["grad_clip"] = None if clip is None else _float_in(opt_cfg, "grad_clip", lo=0.0)
    schedule = get(opt_cfg, "schedule", default_optimizer_config)
    if schedule not in SCHEDULES:
        raise _bad("schedule", schedule, f"must be one of {SCHEDULES}")
    out["schedule"] = schedule
    out["warmup_steps"] = _int_from(opt_cfg, "warmup_steps", lo=0)
    out["decay_steps"] = _int_from(opt_cfg, "decay_steps", lo=0)
    out["final_lr_ratio"] = _float_in(opt_cfg, "final_lr_ratio", lo=0.0, hi=1.0)
    out["wsd_decay_fraction"] = _float_in(opt_cfg, "wsd_decay_fraction", lo=0.0, hi=1.0)
    shape = get(opt_cfg, "wsd_decay_shape", default_optimizer_config)
    if shape not in WSD_DECAY_SHAPES:
        raise _bad("wsd_decay_shape", shape, f"must be one of {WSD_DECAY_SHAPES}")
    out["wsd_decay_shape"] = shape
    out["accumulation_steps"] = _int_from(opt_cfg, "accumulation_steps", lo=1)

    if schedule != "constant" and out["decay_steps"] < out["warmup_steps"]:
        raise _bad("decay_steps", out["decay_steps"],
                   f"must be >= optimizer.warmup_steps={out['warmup_steps']} for schedule {schedule!r}")
    if schedule == "wsd" and wsd_decay_start(out) < out["warmup_steps"]:
        raise _bad("wsd_decay_fraction", out["wsd_decay_fraction"],
                   f"the WSD decay would start at step {wsd_decay_start(out)}, inside the warm-up "
                   f"(optimizer.warmup_steps={out['warmup_steps']})")
    return out


def wsd_decay_start(opt: Mapping[str, Any]) -> int:
    """The step where the WSD decay begins (``opt``: a validated optimizer config)."""
    return opt["decay_steps"] - int(round(opt["wsd_decay_fraction"] * opt["decay_steps"]))


# --------------------------------------------------------------------------
# What a config describes
# --------------------------------------------------------------------------


def model_config_from(config: Any) -> ml_collections.ConfigDict:
    """The model config a training config describes (``model`` + ``model_overrides``)."""
    model = get(config, "model")
    overrides = as_dict(get(config, "model_overrides"))
    if isinstance(model, str) and model == "hf":
        from dsjax.hf.config import from_hf, read_hf_config  # noqa: PLC0415 (only for model="hf")

        path = get(config, "init_from")
        if not path:
            raise ValueError('config.model="hf" reads the model from config.init_from, which is empty')
        return from_hf(read_hf_config(path), source=os.path.join(path, "config.json"), **overrides)
    if isinstance(model, str):
        return make_config(model, **overrides)
    return make_config(as_dict(model), **overrides)


def run_mesh(config: Any) -> jax.sharding.Mesh:
    """The mesh ``config.mesh`` describes. Left unset on one process, it is data parallel over as
    many devices as a micro-batch splits evenly over (normally all of them; a warning says when fewer)."""
    sizes = parallel.mesh_sizes_from_config(get(config, "mesh"))
    micro_batch = get(config, "batch_size") // validate_optimizer_config(get(config, "optimizer"))["accumulation_steps"]
    devices = jax.devices()
    if sizes == {"data": -1} and jax.process_count() == 1 and micro_batch % len(devices):
        used = max(d for d in range(1, len(devices) + 1) if micro_batch % d == 0)
        log.warning("config.mesh is unset: data parallel over %d of the %d devices (a micro-batch of %d rows does "
                    "not split over all of them); set config.mesh to choose", used, len(devices), micro_batch)
        return parallel.make_mesh({"data": used}, devices=devices[:used])
    return parallel.make_mesh(sizes, devices)
