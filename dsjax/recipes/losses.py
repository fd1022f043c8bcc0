"""Pieces of training losses, as pure functions: next-token log-likelihoods and cross-entropy over
a mask, the MTP modules' targets, and the MoE balance loss. Recipes (`dsjax.recipes.pretrain`,
`dsjax.recipes.dsa`, your own) build their loss from them; see `dsjax.train.recipe` for the
loss signature the loop wants."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_nll", "masked_mean", "cross_entropy", "mtp_targets", "balance_loss_sum"]


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
