"""Optimizer and learning-rate schedules for dsjax training.

The optimizer is AdamW with decoupled weight decay, global-norm gradient clipping, an optional
learning-rate warm-up followed by a cosine or WSD (warm-up / stable / decay) schedule, and a way
to freeze parts of the parameter tree. Its hyper-parameters are the ``optimizer`` section of a
training config (:func:`dsjax.train.config.default_optimizer_config`); gradient accumulation
happens in the train step (:mod:`dsjax.train.step`), so one ``update`` is one optimizer step.

Parameter-tree conventions (Flax Linen ``params``, a nested dict):

* linear weights are ``kernel``, embeddings ``embedding``: these get weight decay;
* RMSNorm / LayerNorm weights are ``scale`` (and ``bias``): no weight decay;
* every MoE router owns an ``e_score_correction_bias`` (shape ``[..., n_experts]``) which is
  *not trained by gradient descent*: the optimizer always returns a zero update for it and keeps
  no state for it. The train step adjusts these biases itself (auxiliary-loss-free load
  balancing, :func:`dsjax.model.router.update_router_biases`).

Frozen leaves (``trainable`` false) and the router biases are handled with
:func:`optax.partition`: the AdamW branch only ever sees the trainable leaves, so frozen leaves
have no Adam moments and do not contribute to the global gradient norm used for clipping.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax

from dsjax.model.router import ROUTER_BIAS
from dsjax.train.config import validate_optimizer_config, wsd_decay_start
from dsjax.tree import leaf_name, path_names

__all__ = [
    "Trainable",
    "make_schedule",
    "weight_decay_mask",
    "trainable_mask",
    "make_optimizer",
]

_DECAYED_NAMES = frozenset({"kernel", "embedding"})
_TRAIN = "train"
_FROZEN = "frozen"

# None / True (all), False (none), a pytree of bools like the params, or a predicate on a leaf's
# path names, e.g. ``lambda names: "indexer" in names``.
Trainable = Union[None, bool, Any, Callable[[tuple[str, ...]], bool]]


# --------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------


def make_schedule(opt_cfg: Any) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count.

    * every schedule starts with a linear warm-up from 0 (step 0) to ``learning_rate`` (step
      ``warmup_steps``);
    * "constant": stays at ``learning_rate`` afterwards;
    * "warmup_cosine": cosine decay from ``learning_rate`` at ``warmup_steps`` to
      ``learning_rate * final_lr_ratio`` at ``decay_steps``;
    * "wsd": stays at ``learning_rate`` until ``decay_steps - round(wsd_decay_fraction *
      decay_steps)``, then decays to ``learning_rate * final_lr_ratio`` at ``decay_steps``,
      linearly ("linear") or as ``1 - sqrt(t)`` ("sqrt").

    Steps past ``decay_steps`` stay at the final value.
    """
    c = validate_optimizer_config(opt_cfg)
    peak = c["learning_rate"]
    final = peak * c["final_lr_ratio"]
    warmup = c["warmup_steps"]
    total = c["decay_steps"]
    kind = c["schedule"]
    decay_start = wsd_decay_start(c) if kind == "wsd" else warmup
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
        t = decay_fraction(step, decay_start)  # wsd
        if sqrt_shape:
            t = jnp.sqrt(t)
        decayed = final + (peak - final) * (1.0 - t)
        return jnp.where(step < warmup, lr, decayed)

    return schedule


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools: True where AdamW weight decay applies.

    True for every ``kernel`` and ``embedding`` leaf; False for ``scale``, ``bias``,
    ``e_score_correction_bias`` and anything else. Works on stacked leaves (the leading layer
    axis plays no role) and on abstract params (``jax.ShapeDtypeStruct``).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path) in _DECAYED_NAMES, params)


def trainable_mask(params: Any, trainable: Trainable = None) -> Any:
    """Pytree of bools: True where the optimizer may update a leaf.

    ``e_score_correction_bias`` leaves are always False. ``trainable`` may be None / True
    (everything else trainable), False (nothing), a pytree of bools with the structure of
    ``params``, or a callable taking the leaf's path as a tuple of strings (e.g.
    ``("layers", "attn", "indexer", "kernel")``) and returning a bool.
    """
    if trainable is None or trainable is True:
        base = jax.tree.map(lambda _: True, params)
    elif trainable is False:
        base = jax.tree.map(lambda _: False, params)
    elif callable(trainable):
        base = jax.tree_util.tree_map_with_path(lambda path, _: bool(trainable(path_names(path))), params)
    else:
        p_struct, t_struct = jax.tree.structure(params), jax.tree.structure(trainable)
        if p_struct != t_struct:
            raise ValueError(f"`trainable` must have the same tree structure as params; got {t_struct} vs {p_struct}")
        base = jax.tree.map(lambda t, _: bool(t), trainable, params)
    return jax.tree_util.tree_map_with_path(lambda path, t: bool(t) and leaf_name(path) != ROUTER_BIAS, base)


# --------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------


def make_optimizer(opt_cfg: Any, params: Any, trainable: Trainable = None) -> optax.GradientTransformation:
    """Builds the training optimizer.

    Structure::

      partition(labels = trainable_mask(params, trainable)):
        "train":  clip_by_global_norm -> AdamW(schedule, weight_decay_mask)
        "frozen": set_to_zero

    * ``e_score_correction_bias`` leaves and leaves with ``trainable`` False always get a zero
      update and carry no optimizer state.
    * Clipping uses the global norm of the *trainable* gradients only.
    * The learning rate follows :func:`make_schedule`, indexed by the optimizer step.

    Args:
      opt_cfg: optimizer config (:func:`dsjax.train.config.default_optimizer_config`);
        ``accumulation_steps`` is the train step's business and plays no role here.
      params: the parameter pytree (real or abstract arrays); only its structure and leaf names
        are used.
      trainable: see :func:`trainable_mask`.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    c = validate_optimizer_config(opt_cfg)
    labels = jax.tree.map(lambda t: _TRAIN if t else _FROZEN, trainable_mask(params, trainable))
    parts = [optax.clip_by_global_norm(c["grad_clip"])] if c["grad_clip"] else []
    parts.append(optax.adamw(learning_rate=make_schedule(c), b1=c["b1"], b2=c["b2"], eps=c["eps"],
                             weight_decay=c["weight_decay"], mask=weight_decay_mask))
    tx = optax.partition({_TRAIN: optax.chain(*parts), _FROZEN: optax.set_to_zero()}, labels)
    return optax.GradientTransformation(tx.init, tx.update)
