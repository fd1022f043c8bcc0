"""Pre-training (DeepSeek-V3 report, sections 2.1.2 and 2.2): the "pretrain" recipe.

    loss = CE(main) + mtp_loss_weight * mean_k CE(MTP module k)
           + balance_loss_alpha * sum over MoE layers of balance_loss

on packed rows of ``config.data`` (:func:`dsjax.data.make_dataset`, each process its own
documents); every cross-entropy is a mean over the positions whose target counts. Router biases
move by the aux-loss-free rule. ``config.dsa.stage`` may be "" (the model's own attention) or
"dense" (dense attention even with an indexer, e.g. before the DSA warm-up).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dsjax.data import make_dataset
from dsjax.model import forward
from dsjax.recipes.losses import balance_loss_sum, cross_entropy, mtp_targets
from dsjax.train.config import as_dict, get, model_config_from
from dsjax.train.loop import TrainResult, train
from dsjax.train.recipe import Batches, Recipe, from_iterable

__all__ = ["STAGES", "pretraining_loss", "data_batches", "recipe", "run"]

STAGES = ("", "dense")  # the dsa.stage values this recipe runs


def pretraining_loss(params, batch: dict, model_config, *, mtp_loss_weight: float = 0.3,
                     balance_loss_alpha: float = 1e-4, dsa_stage: str | None = None):
    """Next-token CE + weighted MTP CE + weighted balance loss (see the module doc).

    ``batch``: the layout of :mod:`dsjax.data` (``tokens``, ``targets``, ``segment_ids``,
    ``positions``, ``loss_mask``, each ``[B, T]``). ``dsa_stage``: the model's attention (None,
    "dense", "warmup", "sparse"; see :mod:`dsjax.model.dsa`).

    Returns ``(loss, metrics, aux)`` with metrics ``loss``, ``lm_loss``, ``mtp_loss`` (mean over
    modules of their CE; 0 without MTP), ``balance_loss`` (unweighted sum over layers) and
    ``target_tokens`` (positions counted by the main CE); ``aux`` is the model's.
    """
    out = forward(params, batch["tokens"], model_config, segment_ids=batch["segment_ids"],
                  positions=batch.get("positions"), dsa_stage=dsa_stage)
    loss_mask = batch["loss_mask"].astype(jnp.float32)
    lm_loss = cross_entropy(out.logits, batch["targets"], loss_mask)
    mtp_loss = jnp.zeros((), jnp.float32)
    if out.mtp_logits is not None and out.mtp_logits.shape[0] > 0:
        per_module = []
        for k in range(out.mtp_logits.shape[0]):
            targets_k, mask_k = mtp_targets(batch["targets"], loss_mask, batch["segment_ids"], k)
            per_module.append(cross_entropy(out.mtp_logits[k], targets_k, mask_k))
        mtp_loss = jnp.mean(jnp.stack(per_module))
    balance = balance_loss_sum(out.aux)
    loss = lm_loss + mtp_loss_weight * mtp_loss + balance_loss_alpha * balance
    metrics = dict(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, balance_loss=balance,
                   target_tokens=jnp.sum(loss_mask))
    return loss, metrics, out.aux


def data_batches(config: Any, process_index: int, process_count: int) -> Batches:
    """This process's packed rows of ``config.data`` (``batch_size / process_count`` per step);
    the grain iterator's position is checkpointed."""
    batch_size = int(get(config, "batch_size"))
    return from_iterable(make_dataset(get(config, "data"), seq_len=int(get(config, "seq_len")),
                                      batch_size=batch_size // process_count, seed=int(get(config, "seed")),
                                      process_index=process_index, process_count=process_count))


def recipe(config: Any) -> Recipe:
    """The pre-training recipe for ``config`` (its model, loss weights and data)."""
    stage = as_dict(get(config, "dsa")).get("stage", "")
    if stage not in STAGES:
        raise ValueError(f"config.dsa.stage={stage!r} is a DSA training stage: it runs with "
                         f"config.recipe='dsa' (the 'pretrain' recipe takes dsa.stage in {STAGES})")
    model_config = ml_collections.FrozenConfigDict(model_config_from(config))
    mtp_loss_weight = float(get(config, "mtp_loss_weight"))
    balance_loss_alpha = float(get(config, "balance_loss_alpha"))

    def loss(params, frozen: dict, batch: dict, rng: jax.Array):
        del frozen, rng  # no frozen trees; the model has no dropout
        return pretraining_loss(params, batch, model_config, mtp_loss_weight=mtp_loss_weight,
                                balance_loss_alpha=balance_loss_alpha, dsa_stage=stage or None)

    return Recipe(loss=loss, batches=data_batches)


def run(config: Any, workdir: str, **kwargs) -> TrainResult:
    """Pre-trains (or resumes) with ``config`` in ``workdir`` (``kwargs``: see :func:`dsjax.train.loop.train`)."""
    return train(config, workdir, recipe(config), **kwargs)
