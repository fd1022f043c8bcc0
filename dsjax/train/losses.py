"""Training losses as pure functions.

Every loss a recipe plugs into :func:`dsjax.train.loop.train` has the signature::

    loss_fn(params, batch, model_config, rng) -> (loss, metrics, aux)

* ``params``: the parameter pytree being differentiated;
* ``batch``: a dict of arrays whose leading axis is the batch (for pre-training
  the layout of :mod:`dsjax.data`: ``tokens``, ``targets``, ``segment_ids``,
  ``positions``, ``loss_mask``, each ``[B, T]``);
* ``model_config``: a hashable (frozen) model config;
* ``rng``: a per-(micro-)step PRNG key;
* ``loss``: a float32 scalar, the quantity minimised;
* ``metrics``: dict of float32 scalars to log (averaged over micro-batches);
* ``aux``: routing statistics keyed by the parameter subtree holding a router
  (the model's ``ModelOutput.aux``); the loop reads ``aux[key]["expert_load"]``
  to move that router's ``e_score_correction_bias``. Return ``{}`` when no
  router bias should move.

Pre-training (DeepSeek-V3 report, sections 2.1.2 and 2.2)::

    loss = CE(main) + mtp_loss_weight * mean_k CE(MTP module k)
           + balance_loss_alpha * sum over MoE layers of balance_loss

Every cross-entropy is a mean over the positions whose target counts.

DeepSeek Sparse Attention stages (V3.2 report, section 2.1; ``dsa_stage``)::

    "warmup": loss = indexer_loss_weight * indexer_kl      (dense attention;
              only the indexer is trained: everything else is frozen)
    "sparse": loss = the pre-training loss + indexer_loss_weight * indexer_kl
              (top-k attention; the indexer's input is detached, so the KL
              trains only the indexer and the LM terms only the model)

``indexer_kl`` is the mean over indexer layers of each layer's mean over
queries of KL(p[t] || softmax(I[t])), where p is the main attention's
probability summed over heads and L1-normalised (over all visible keys in
"warmup", over the selected keys S_t in "sparse"). ``topk_attention_recall``
(logged) is the share of the dense attention mass inside S_t.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dsjax.model.transformer import forward

__all__ = [
    "LossFn",
    "token_nll",
    "masked_mean",
    "cross_entropy",
    "mtp_targets",
    "balance_loss_sum",
    "DSA_STAGES",
    "indexer_stats",
    "pretraining_loss",
    "make_pretraining_loss",
]

LossFn = Callable[[Any, dict, Any, jax.Array], tuple[jax.Array, dict, dict]]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Negative log-likelihood of ``targets`` under ``logits`` [..., V], in float32."""
  logits = logits.astype(jnp.float32)
  log_norm = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return log_norm - picked


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(values * mask) / sum(mask); 0 when the mask is empty."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(values.astype(jnp.float32) * mask)
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the positions where ``mask`` is 1."""
  nll = token_nll(logits, targets)
  # Masked-out positions may hold any target id (padding): zero them before the
  # product so an inf there cannot turn into a NaN.
  nll = jnp.where(mask > 0, nll, 0.0)
  return masked_mean(nll, mask)


def _shift_left(x: jax.Array, n: int, fill) -> jax.Array:
  """x[:, i + n] at position i; ``fill`` past the end of the row."""
  if n == 0:
    return x
  tail = jnp.full(x.shape[:1] + (n,) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, n:], tail], axis=1)


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array,
                module: int) -> tuple[jax.Array, jax.Array]:
  """Targets and mask of MTP module ``module`` (0-based).

  Module k at position i predicts token i + k + 2, i.e. ``targets[i + k + 1]``.
  That position counts iff tokens i, i + 1, ..., i + k + 2 all lie in one
  (non-padding) segment and ``loss_mask`` keeps the target itself
  (``loss_mask[i + k + 1]``). The same-segment chain is read from
  ``segment_ids``, so a ``loss_mask`` that also hides e.g. prompt tokens only
  removes positions whose own MTP target is hidden.

  Returns:
    (targets_k [B, T] int32, mask_k [B, T] float32); positions past the end of
    the row have mask 0.
  """
  shift = module + 1
  targets_k = _shift_left(targets.astype(jnp.int32), shift, 0)
  mask_k = _shift_left(loss_mask.astype(jnp.float32), shift, 0.0)
  segment_ids = segment_ids.astype(jnp.int32)
  # Token j of the row is segment_ids[j]; the chain i .. i + shift + 1 is
  # unbroken iff every neighbouring pair in it shares a segment.
  same = segment_ids != 0
  for j in range(shift + 1):
    left = _shift_left(segment_ids, j, 0)
    right = _shift_left(segment_ids, j + 1, -1)
    same = same & (left == right)
  return targets_k, mask_k * same.astype(jnp.float32)


def balance_loss_sum(aux: dict) -> jax.Array:
  """Sum of the sequence-wise balance losses of every MoE layer.

  Covers every router-holding subtree of ``aux`` (the main model's MoE stack,
  one value per layer, and each MTP module's MoE layer).
  """
  total = jnp.zeros((), jnp.float32)
  for stats in aux.values():
    if "balance_loss" in stats:
      total = total + jnp.sum(stats["balance_loss"].astype(jnp.float32))
  return total


# "" (or None): the model's own attention (top-k sparse when it has an indexer);
# "dense": dense attention, indexer unused (e.g. a dense phase before the warm-up).
DSA_STAGES = ("", "dense", "warmup", "sparse")


def indexer_stats(aux: dict) -> tuple[jax.Array, jax.Array]:
  """(mean indexer KL, mean top-k attention recall) over every indexer layer in ``aux``."""
  kl = [jnp.ravel(stats["indexer_kl"]) for stats in aux.values() if "indexer_kl" in stats]
  if not kl:
    raise ValueError("the model reported no indexer statistics: dsa_stage 'warmup' and 'sparse' need a "
                     "model with an indexer (model.use_indexer=True, a V3.2 preset)")
  recall = [jnp.ravel(stats["topk_attention_recall"]) for stats in aux.values() if "indexer_kl" in stats]
  return (jnp.mean(jnp.concatenate(kl).astype(jnp.float32)),
          jnp.mean(jnp.concatenate(recall).astype(jnp.float32)))


def pretraining_loss(params, batch: dict, model_config, rng: jax.Array | None = None, *,
                     mtp_loss_weight: float = 0.3, balance_loss_alpha: float = 1e-4,
                     dsa_stage: str | None = None, indexer_loss_weight: float = 1.0):
  """Next-token CE + weighted MTP CE + weighted balance loss (see the module doc),
  or a DSA stage's loss when ``dsa_stage`` is "warmup" / "sparse".

  Returns ``(loss, metrics, aux)`` with metrics ``loss``, ``lm_loss``,
  ``mtp_loss`` (mean over modules of their CE; 0 without MTP), ``balance_loss``
  (unweighted sum over layers) and ``target_tokens`` (positions counted by the
  main CE); in a DSA stage also ``indexer_kl`` and ``topk_attention_recall``.
  """
  del rng  # the model has no dropout
  if (dsa_stage or "") not in DSA_STAGES:
    raise ValueError(f"dsa_stage={dsa_stage!r}: expected one of {DSA_STAGES}")
  out = forward(params, batch["tokens"], model_config, segment_ids=batch["segment_ids"],
                positions=batch.get("positions"), dsa_stage=dsa_stage or None)
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
  metrics = dict(lm_loss=lm_loss, mtp_loss=mtp_loss, balance_loss=balance, target_tokens=jnp.sum(loss_mask))
  if dsa_stage in ("warmup", "sparse"):
    kl, recall = indexer_stats(out.aux)
    metrics.update(indexer_kl=kl, topk_attention_recall=recall)
    # Warm-up trains only the indexer, which the (dense) LM loss cannot reach.
    loss = indexer_loss_weight * kl + (0.0 if dsa_stage == "warmup" else loss)
  metrics["loss"] = loss
  return loss, metrics, out.aux


def make_pretraining_loss(mtp_loss_weight: float = 0.3, balance_loss_alpha: float = 1e-4,
                          dsa_stage: str | None = None, indexer_loss_weight: float = 1.0) -> LossFn:
  """:func:`pretraining_loss` with its weights bound: a ``loss_fn`` for the loop."""
  mtp_loss_weight = float(mtp_loss_weight)
  balance_loss_alpha = float(balance_loss_alpha)
  indexer_loss_weight = float(indexer_loss_weight)
  if (dsa_stage or "") not in DSA_STAGES:
    raise ValueError(f"dsa_stage={dsa_stage!r}: expected one of {DSA_STAGES}")

  def loss_fn(params, batch, model_config, rng):
    return pretraining_loss(params, batch, model_config, rng, mtp_loss_weight=mtp_loss_weight,
                            balance_loss_alpha=balance_loss_alpha, dsa_stage=dsa_stage,
                            indexer_loss_weight=indexer_loss_weight)

  return loss_fn
