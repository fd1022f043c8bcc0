"""DeepSeek Sparse Attention training (V3.2 report, section 2.1): the "dsa" recipe.

Two stages turn a dense-attention model into a DSA one (``config.dsa.stage``; the data are
pre-training's):

1. "warmup": attention stays dense, every parameter but the indexers is frozen (router biases
   too), and the loss is ``indexer_loss_weight * indexer_kl``, KL(p[t,:] || softmax(I[t,:]));
2. "sparse": attention over the indexer's top-k keys only; the model learns from the
   pre-training loss, the indexer (its input detached) from ``indexer_loss_weight *
   indexer_kl``, KL(p[t,S_t] || softmax(I[t,S_t])).

p is the main attention's probability summed over heads and L1-normalised; both stages log
``indexer_kl`` and ``topk_attention_recall`` (the share of dense attention mass inside the top-k;
:func:`dsjax.model.dsa.indexer_stats`).

A stage normally starts from a checkpoint (``init_from``). From nothing, the indexer would learn
to imitate the nearly uniform attention of a random model, so :func:`run` first pre-trains
densely for ``dsa.dense_pretrain_steps`` steps in ``WORKDIR/dense_pretrain`` (the "pretrain"
recipe with ``dsa.stage="dense"``) and starts the stage from there.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from dsjax.checkpoint import CHECKPOINTS_SUBDIR, complete_steps
from dsjax.model.dsa import indexer_stats
from dsjax.recipes import pretrain
from dsjax.train.config import as_dict, get, model_config_from, validate_train_config
from dsjax.train.loop import TrainResult, train
from dsjax.train.recipe import Recipe

__all__ = ["STAGES", "DENSE_PRETRAIN_DIR", "indexer_only", "stage_loss", "recipe", "dense_pretrain_config", "run"]

STAGES = ("warmup", "sparse")
DENSE_PRETRAIN_DIR = "dense_pretrain"


def indexer_only(names: tuple[str, ...]) -> bool:
    """The warm-up's ``trainable`` predicate: only the lightning indexers' parameters."""
    return "indexer" in names


def stage_loss(params, batch: dict, model_config, *, stage: str, mtp_loss_weight: float = 0.3,
               balance_loss_alpha: float = 1e-4, indexer_loss_weight: float = 1.0):
    """The loss of DSA stage ``stage`` (see the module doc): ``(loss, metrics, aux)`` with the
    pre-training metrics plus ``indexer_kl`` and ``topk_attention_recall``."""
    lm, metrics, aux = pretrain.pretraining_loss(params, batch, model_config, mtp_loss_weight=mtp_loss_weight,
                                                 balance_loss_alpha=balance_loss_alpha, dsa_stage=stage)
    kl, recall = indexer_stats(aux)
    # The warm-up trains only the indexer, which the (dense) LM loss cannot reach.
    loss = indexer_loss_weight * kl + (0.0 if stage == "warmup" else lm)
    return loss, dict(metrics, loss=loss, indexer_kl=kl, topk_attention_recall=recall), aux


def recipe(config: Any) -> Recipe:
    """The recipe of ``config.dsa.stage`` for ``config``'s model (which must have an indexer)."""
    dsa = as_dict(get(config, "dsa"))
    stage = dsa.get("stage", "")
    if stage not in STAGES:
        raise ValueError(f"config.dsa.stage={stage!r}: the 'dsa' recipe's dsa.stage must be one of {STAGES}")
    model_config = ml_collections.FrozenConfigDict(model_config_from(config))
    if not model_config.use_indexer:
        raise ValueError(f"config.dsa.stage={stage!r} needs a model with an indexer (model.use_indexer=True, "
                         "e.g. a V3.2 preset)")
    weights = dict(mtp_loss_weight=float(get(config, "mtp_loss_weight")),
                   balance_loss_alpha=float(get(config, "balance_loss_alpha")),
                   indexer_loss_weight=float(dsa.get("indexer_loss_weight", 1.0)))

    def loss(params, frozen: dict, batch: dict, rng: jax.Array):
        del frozen, rng
        return stage_loss(params, batch, model_config, stage=stage, **weights)

    warmup = stage == "warmup"
    return Recipe(loss=loss, batches=pretrain.data_batches, trainable=indexer_only if warmup else None,
                  update_router_biases=not warmup)


def dense_pretrain_config(config: Any) -> Any:
    """The config of the dense phase: the same model, data and optimizer, the "pretrain" recipe with
    dense attention, every parameter trained, ``dsa.dense_pretrain_steps`` steps."""
    dense = config.copy_and_resolve_references()
    with dense.unlocked():
        dense.recipe = "pretrain"
        dense.dsa.stage = "dense"
        dense.num_steps = config.dsa.dense_pretrain_steps
        dense.optimizer.decay_steps = dense.num_steps
        dense.optimizer.warmup_steps = min(dense.optimizer.warmup_steps, max(dense.num_steps // 10, 1))
    return dense


def run(config: Any, workdir: str, **kwargs) -> TrainResult:
    """Runs the stage of ``config`` in ``workdir``, after the dense phase when one is due.

    The dense phase runs only when the stage starts from nothing: ``dsa.dense_pretrain_steps > 0``,
    ``init_from`` is empty and ``workdir`` holds no checkpoint yet. It is itself resumable, and
    the stage then starts from its last checkpoint. ``kwargs``: see :func:`dsjax.train.loop.train`.
    """
    validate_train_config(config)
    stage_recipe = recipe(config)  # a bad stage or model fails here, before anything runs
    print_fn = kwargs.get("print_fn", print)
    steps = int(config.dsa.dense_pretrain_steps)
    if steps > 0 and not config.init_from and not complete_steps(os.path.join(workdir, CHECKPOINTS_SUBDIR)):
        dense_dir = os.path.join(workdir, DENSE_PRETRAIN_DIR)
        if print_fn:
            print_fn(f"No init_from: {steps} steps of dense pre-training first, in {dense_dir}")
        pretrain.run(dense_pretrain_config(config), dense_dir, **kwargs)
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.init_from = dense_dir
        if print_fn:
            print_fn(f"DSA {config.dsa.stage} stage from {dense_dir}")
    return train(config, workdir, stage_recipe, **kwargs)
