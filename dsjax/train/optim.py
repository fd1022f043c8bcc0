"""Optimizer and learning-rate schedules for dsjax training.

The optimizer is AdamW with decoupled weight decay, global-norm gradient
clipping, an optional learning-rate warm-up followed by a cosine or WSD
(warm-up / stable / decay) schedule, optional gradient accumulation, and a way
to freeze parts of the parameter tree.

Parameter-tree conventions (Flax Linen ``params``, a nested dict):

* linear weights are ``kernel``, embeddings ``embedding``: these get weight
  decay;
* RMSNorm / LayerNorm weights are ``scale`` (and ``bias``): no weight decay;
* every MoE router owns an ``e_score_correction_bias`` (shape
  ``[..., n_experts]``) which is *not trained by gradient descent*: the
  optimizer always returns a zero update for it and keeps no state for it. The
  training loop adjusts these biases itself (auxiliary-loss-free load
  balancing) outside the optimizer.

Frozen leaves (``trainable`` false) and the router biases are handled with
:func:`optax.partition`: the AdamW branch only ever sees the trainable leaves,
so frozen leaves have no Adam moments, no accumulation buffers, and do not
contribute to the global gradient norm used for clipping.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

__all__ = [
    "SCHEDULES",
    "WSD_DECAY_SHAPES",
    "ROUTER_BIAS_NAME",
    "default_optimizer_config",
    "validate_optimizer_config",
    "make_schedule",
    "indexer_only",
    "weight_decay_mask",
    "trainable_mask",
    "make_optimizer",
]

SCHEDULES = ("constant", "warmup_cosine", "wsd")
WSD_DECAY_SHAPES = ("linear", "sqrt")
ROUTER_BIAS_NAME = "e_score_correction_bias"
_DECAYED_NAMES = frozenset({"kernel", "embedding"})

_TRAIN = "train"
_FROZEN = "frozen"

Trainable = Union[None, bool, Any, Callable[[tuple[str, ...]], bool]]


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Reference optimizer hyper-parameters of DeepSeek-V3.

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
    accumulation_steps: micro-batches per optimizer update (``MultiSteps``).
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


def _get(opt_cfg: Any, key: str) -> Any:
  """Reads ``key`` from a ConfigDict / mapping / object, else the default."""
  if isinstance(opt_cfg, Mapping):
    if key in opt_cfg:
      return opt_cfg[key]
  elif isinstance(opt_cfg, ml_collections.ConfigDict):
    if key in opt_cfg:
      return opt_cfg[key]
  elif hasattr(opt_cfg, key):
    return getattr(opt_cfg, key)
  return default_optimizer_config()[key]


def _bad(key: str, value: Any, why: str) -> ValueError:
  return ValueError(f"optimizer.{key}={value!r}: {why}")


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_float(cfg, key, *, lo=None, hi=None, lo_open=False, hi_open=False):
  value = _get(cfg, key)
  if not _is_number(value) or not math.isfinite(value):
    raise _bad(key, value, "must be a finite number")
  if lo is not None and (value < lo or (lo_open and value == lo)):
    raise _bad(key, value, f"must be {'>' if lo_open else '>='} {lo}")
  if hi is not None and (value > hi or (hi_open and value == hi)):
    raise _bad(key, value, f"must be {'<' if hi_open else '<='} {hi}")
  return float(value)


def _check_int(cfg, key, *, lo):
  value = _get(cfg, key)
  if not _is_int(value):
    raise _bad(key, value, "must be an integer")
  if value < lo:
    raise _bad(key, value, f"must be >= {lo}")
  return int(value)


def validate_optimizer_config(opt_cfg: Any) -> dict[str, Any]:
  """Checks the optimizer config; returns a plain dict of all keys.

  Missing keys take their :func:`default_optimizer_config` value.

  Raises:
    ValueError: naming the offending ``optimizer.<key>``.
  """
  out: dict[str, Any] = {}
  out["learning_rate"] = _check_float(opt_cfg, "learning_rate", lo=0.0)
  out["b1"] = _check_float(opt_cfg, "b1", lo=0.0, hi=1.0, hi_open=True)
  out["b2"] = _check_float(opt_cfg, "b2", lo=0.0, hi=1.0, hi_open=True)
  out["eps"] = _check_float(opt_cfg, "eps", lo=0.0)
  out["weight_decay"] = _check_float(opt_cfg, "weight_decay", lo=0.0)
  clip = _get(opt_cfg, "grad_clip")
  if clip is None:
    out["grad_clip"] = None
  else:
    out["grad_clip"] = _check_float(opt_cfg, "grad_clip", lo=0.0)
  schedule = _get(opt_cfg, "schedule")
  if schedule not in SCHEDULES:
    raise _bad("schedule", schedule, f"must be one of {SCHEDULES}")
  out["schedule"] = schedule
  out["warmup_steps"] = _check_int(opt_cfg, "warmup_steps", lo=0)
  out["decay_steps"] = _check_int(opt_cfg, "decay_steps", lo=0)
  out["final_lr_ratio"] = _check_float(opt_cfg, "final_lr_ratio", lo=0.0,
                                       hi=1.0)
  out["wsd_decay_fraction"] = _check_float(opt_cfg, "wsd_decay_fraction",
                                           lo=0.0, hi=1.0)
  shape = _get(opt_cfg, "wsd_decay_shape")
  if shape not in WSD_DECAY_SHAPES:
    raise _bad("wsd_decay_shape", shape, f"must be one of {WSD_DECAY_SHAPES}")
  out["wsd_decay_shape"] = shape
  out["accumulation_steps"] = _check_int(opt_cfg, "accumulation_steps", lo=1)

  if schedule != "constant" and out["decay_steps"] < out["warmup_steps"]:
    raise _bad("decay_steps", out["decay_steps"],
               f"must be >= optimizer.warmup_steps={out['warmup_steps']} "
               f"for schedule {schedule!r}")
  if schedule == "wsd":
    decay_start = _wsd_decay_start(out)
    if decay_start < out["warmup_steps"]:
      raise _bad("wsd_decay_fraction", out["wsd_decay_fraction"],
                 f"the WSD decay would start at step {decay_start}, inside "
                 f"the warm-up (optimizer.warmup_steps={out['warmup_steps']})")
  return out


def _wsd_decay_start(c: Mapping[str, Any]) -> int:
  decay_len = int(round(c["wsd_decay_fraction"] * c["decay_steps"]))
  return c["decay_steps"] - decay_len


# --------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------


def make_schedule(opt_cfg: Any) -> optax.Schedule:
  """Learning rate as a function of the optimizer step count.

  * every schedule starts with a linear warm-up from 0 (step 0) to
    ``learning_rate`` (step ``warmup_steps``);
  * "constant": stays at ``learning_rate`` afterwards;
  * "warmup_cosine": cosine decay from ``learning_rate`` at ``warmup_steps``
    to ``learning_rate * final_lr_ratio`` at ``decay_steps``;
  * "wsd": stays at ``learning_rate`` until
    ``decay_steps - round(wsd_decay_fraction * decay_steps)``, then decays to
    ``learning_rate * final_lr_ratio`` at ``decay_steps``, linearly
    ("linear") or as ``1 - sqrt(t)`` ("sqrt").

  Steps past ``decay_steps`` stay at the final value.
  """
  c = validate_optimizer_config(opt_cfg)
  peak = c["learning_rate"]
  final = peak * c["final_lr_ratio"]
  warmup = c["warmup_steps"]
  total = c["decay_steps"]
  kind = c["schedule"]
  decay_start = _wsd_decay_start(c) if kind == "wsd" else warmup
  sqrt_shape = c["wsd_decay_shape"] == "sqrt"

  def warmup_value(step):
    if warmup == 0:
      return jnp.full_like(step, peak)
    return peak * jnp.minimum(step / warmup, 1.0)

  def decay_fraction(step, start):
    """Progress in [0, 1] through the decay phase [start, total]."""
    span = total - start
    if span <= 0:
      return (step >= start).astype(step.dtype)
    return jnp.clip((step - start) / span, 0.0, 1.0)

  def schedule(count):
    step = jnp.asarray(count, dtype=jnp.float32)
    lr = warmup_value(step)
    if kind == "constant":
      return lr
    if kind == "warmup_cosine":
      t = decay_fraction(step, warmup)
      cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
      return jnp.where(step < warmup, lr, cosine)
    # wsd
    t = decay_fraction(step, decay_start)
    if sqrt_shape:
      t = jnp.sqrt(t)
    decayed = final + (peak - final) * (1.0 - t)
    return jnp.where(step < warmup, lr, decayed)

  return schedule


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def _leaf_name(path) -> str | None:
  """Name of a leaf = the last dict key / attribute on its path.

  Attribute keys named ``value`` (the payload of Flax metadata boxes such as
  ``nn.Partitioned``) are skipped so boxed params are named like plain ones.
  """
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      return key.name
  return None


def _path_names(path) -> tuple[str, ...]:
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  return tuple(names)


def indexer_only(names: tuple[str, ...]) -> bool:
  """A ``trainable`` predicate: only the lightning indexers' parameters (the DSA warm-up)."""
  return "indexer" in names


def weight_decay_mask(params: Any) -> Any:
  """Pytree of bools: True where AdamW weight decay applies.

  True for every ``kernel`` and ``embedding`` leaf; False for ``scale``,
  ``bias``, ``e_score_correction_bias`` and anything else. Works on stacked
  leaves (the leading layer axis plays no role) and on abstract params
  (``jax.ShapeDtypeStruct``).
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) in _DECAYED_NAMES, params)


def trainable_mask(params: Any, trainable: Trainable = None) -> Any:
  """Pytree of bools: True where the optimizer may update a leaf.

  ``e_score_correction_bias`` leaves are always False. ``trainable`` may be
  None / True (everything else trainable), False (nothing), a pytree of bools
  with the structure of ``params``, or a callable taking the leaf's path as a
  tuple of strings (e.g. ``("layers", "attn", "indexer", "kernel")``) and
  returning a bool.
  """
  if trainable is None or trainable is True:
    base = jax.tree.map(lambda _: True, params)
  elif trainable is False:
    base = jax.tree.map(lambda _: False, params)
  elif callable(trainable):
    base = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(trainable(_path_names(path))), params)
  else:
    p_struct = jax.tree.structure(params)
    t_struct = jax.tree.structure(trainable)
    if p_struct != t_struct:
      raise ValueError(
          "`trainable` must have the same tree structure as params; got "
          f"{t_struct} vs {p_struct}")
    base = jax.tree.map(lambda t, _: bool(t), trainable, params)
  return jax.tree_util.tree_map_with_path(
      lambda path, t: bool(t) and _leaf_name(path) != ROUTER_BIAS_NAME, base)


# --------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------


def make_optimizer(
    opt_cfg: Any,
    params: Any,
    trainable: Trainable = None,
) -> optax.GradientTransformation:
  """Builds the training optimizer.

  Structure::

    partition(labels = trainable_mask(params, trainable)):
      "train":  [MultiSteps(k)] (clip_by_global_norm -> AdamW(schedule, mask))
      "frozen": set_to_zero

  * ``e_score_correction_bias`` leaves and leaves with ``trainable`` False
    always get a zero update and carry no optimizer state.
  * Clipping uses the global norm of the *trainable* gradients only.
  * The learning rate follows :func:`make_schedule`, indexed by the number of
    real (post-accumulation) optimizer updates.
  * With ``accumulation_steps = k > 1`` the trainable branch is wrapped in
    ``optax.MultiSteps``: the training loop must call ``update`` once per
    micro-batch; the first ``k - 1`` calls accumulate the (running mean)
    gradient and return zero updates, the k-th applies one AdamW step on the
    mean of the k micro-batch gradients. The accumulation buffer only covers
    trainable leaves. Loops that need to know whether a real update happened
    can count micro-batches (every k-th call).

  Args:
    opt_cfg: optimizer ConfigDict (see :func:`default_optimizer_config`).
    params: the parameter pytree (real or abstract arrays); only its structure
      and leaf names are used.
    trainable: see :func:`trainable_mask`.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.
  """
  c = validate_optimizer_config(opt_cfg)
  labels_mask = trainable_mask(params, trainable)
  labels = jax.tree.map(lambda t: _TRAIN if t else _FROZEN, labels_mask)

  parts = []
  if c["grad_clip"]:
    parts.append(optax.clip_by_global_norm(c["grad_clip"]))
  parts.append(
      optax.adamw(
          learning_rate=make_schedule(c),
          b1=c["b1"],
          b2=c["b2"],
          eps=c["eps"],
          weight_decay=c["weight_decay"],
          mask=weight_decay_mask,
      ))
  train_tx = optax.chain(*parts)
  if c["accumulation_steps"] > 1:
    train_tx = optax.MultiSteps(
        train_tx, every_k_schedule=c["accumulation_steps"],
        use_grad_mean=True).gradient_transformation()

  tx = optax.partition(
      {_TRAIN: train_tx, _FROZEN: optax.set_to_zero()}, labels)
  return optax.GradientTransformation(tx.init, tx.update)
