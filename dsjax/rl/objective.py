"""The GRPO objective of the DeepSeek-V3.2 report (section 3), with the variants other frameworks use.

For a group of G outputs o_i of one prompt, with rewards R_i, and per token t of o_i:

    A_i   = R_i - mean_j R_j                                   (group_advantages, scale="none")
    r_it  = pi_theta(o_it) / pi_old(o_it)                       (pi_old: the sampler's probabilities)
    D_it  = r_it * (rho_it - log rho_it - 1),  rho_it = pi_ref(o_it) / pi_theta(o_it)
    M_i   = 0 if A_i < 0 and mean_t log(pi_old(o_it) / pi_theta(o_it)) > delta, else 1
    J     = (1/G) sum_i (1/|o_i|) sum_t [min(r_it A_i, clip(r_it, 1 - eps, 1 + eps_high) A_i) M_i - beta D_it]

`grpo_loss` returns -J for a batch of B sequences (B in place of G: the batch may hold several
groups). r_it stays attached in D_it: that factor is what makes the KL estimate's gradient
unbiased for samples drawn from pi_old. M_i is a stop-gradient selection, never differentiated.

Variants (keyword arguments), for comparison with TRL / verl / Tunix runs:
    aggregation="sequence_mean"  the formula above (token mean per sequence, then mean over the B rows)
                "token_mean"     DAPO: sum over all generated tokens / number of generated tokens
                "fixed_length"   Dr. GRPO: sum over all generated tokens / (B * max_length)
    ratio_level="token"          r_it as above
                "sequence"       GSPO: s_i = exp(mean_t log r_it) replaces r_it in the clipped
                                 surrogate (with gradient through s_i); the KL term keeps r_it.

Every per-token input is masked *before* any arithmetic, so padded positions may hold anything
(-inf, nan, 1e30) without reaching values or gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

AGGREGATIONS = ("sequence_mean", "token_mean", "fixed_length")
RATIO_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("none", "group_std", "batch_std")

# Added to the standard deviation before dividing, as TRL and Tunix do, so constant groups give 0.
STD_EPS = 1e-6


def group_advantages(rewards: Any, scale: str = "none") -> jax.Array:
    """Group-relative advantages R - mean(group) for rewards shaped [num_prompts, G].

    scale="none" is the V3.2 estimator. "group_std" divides by each group's standard deviation,
    "batch_std" by the standard deviation of all rewards in the batch; both use ddof=1 (the
    unbiased estimate, as torch.std in TRL and Tunix) and add STD_EPS. A one-sample "batch" or
    group has standard deviation 0 here rather than nan.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_prompts, G], got shape {rewards.shape}")
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.float32)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if scale == "none":
        return centred
    if scale == "group_std":
        std = _std_ddof1(rewards, axis=1, keepdims=True)
    else:
        std = _std_ddof1(rewards, axis=None, keepdims=False)
    return centred / (std + STD_EPS)


def _std_ddof1(x: jax.Array, *, axis: int | None, keepdims: bool) -> jax.Array:
    """Standard deviation with ddof=1, and 0 (not nan) when there is a single sample."""
    count = x.size if axis is None else x.shape[axis]
    if count < 2:
        return jnp.zeros_like(x.mean(axis=axis, keepdims=keepdims))
    return jnp.std(x, axis=axis, keepdims=keepdims, ddof=1)


def sequence_log_ratio(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sequence mean over generated tokens of log(pi_theta / pi_old), [B]; 0 for empty rows."""
    valid = jnp.asarray(mask) > 0
    log_ratio = jnp.where(valid, logprobs, 0) - jnp.where(valid, old_logprobs, 0)
    lengths = valid.sum(axis=-1)
    return log_ratio.sum(axis=-1) / jnp.maximum(lengths, 1).astype(log_ratio.dtype)


def off_policy_sequence_mask(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                             mask: jax.Array, delta: float) -> jax.Array:
    """M_i of the V3.2 report, [B] in {0, 1}: 0 drops a negative-advantage sequence that drifted too far.

    Drift is mean_t log(pi_old / pi_theta) over the sequence's generated tokens; the mask is a
    selection, so it carries no gradient.
    """
    drift = -sequence_log_ratio(jax.lax.stop_gradient(logprobs), old_logprobs, mask)
    drop = (jnp.asarray(advantages) < 0) & (drift > delta)
    return jax.lax.stop_gradient(jnp.where(drop, 0.0, 1.0).astype(drift.dtype))


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, *, epsilon: float = 0.2, epsilon_high: float | None = None,
              kl_coef: float | jax.Array = 0.0, off_policy_delta: float | None = None,
              aggregation: str = "sequence_mean", max_length: int | None = None,
              ratio_level: str = "token") -> tuple[jax.Array, dict[str, jax.Array]]:
    """-J of the module docstring, and float32 scalar metrics.

    logprobs, old_logprobs, ref_logprobs, mask: [B, N] (log-probabilities of the sampled tokens
    under the trained, sampling and reference policies; mask is 1 on generated tokens).
    advantages: [B]. kl_coef: a float or a [B] array (a per-row KL weight, e.g. 0 for math rows in
    mixed RL); ref_logprobs may be None when kl_coef is the float 0. epsilon_high None means
    epsilon; off_policy_delta None disables the off-policy mask. Rows with no generated token
    contribute 0 (they still count among the B rows of "sequence_mean" and "fixed_length").

    Metrics: policy_loss and kl_loss (loss = policy_loss + kl_loss), kl (masked token mean of D,
    unweighted), clip_fraction (share of generated tokens whose surrogate is the clipped one, so
    they get no policy gradient) with its low/high parts, off_policy_masked_fraction (share of rows
    with M_i = 0), ratio_min / ratio_mean / ratio_max of the token ratio r_it, sampler_logprob_gap
    (masked token mean of log pi_old - log pi_theta) and mean_length.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if aggregation == "fixed_length" and (max_length is None or max_length <= 0):
        raise ValueError("aggregation='fixed_length' needs a positive max_length")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high

    logprobs = jnp.asarray(logprobs)
    dtype = jnp.promote_types(logprobs.dtype, jnp.float32)
    shape = logprobs.shape
    if len(shape) != 2:
        raise ValueError(f"logprobs must be [B, N], got shape {shape}")
    for name, value in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if value is not None and jnp.shape(value) != shape:
            raise ValueError(f"{name} must have the shape of logprobs {shape}, got {jnp.shape(value)}")
    if jnp.shape(advantages) != shape[:1]:
        raise ValueError(f"advantages must be [B] = {shape[:1]}, got {jnp.shape(advantages)}")
    per_row_kl = not isinstance(kl_coef, (int, float))
    if per_row_kl and jnp.shape(kl_coef) not in ((), shape[:1]):
        raise ValueError(f"kl_coef must be a float or a [B] = {shape[:1]} array, got {jnp.shape(kl_coef)}")
    use_kl = per_row_kl or kl_coef != 0
    if use_kl and ref_logprobs is None:
        raise ValueError("ref_logprobs is needed when kl_coef is not the float 0")

    valid = jnp.asarray(mask) > 0
    weights = valid.astype(dtype)
    # Zero padded positions first: where() before any subtraction or exp keeps garbage out of
    # both the values and (since the unselected branch gets a zero cotangent) the gradients.
    logp = jnp.where(valid, logprobs.astype(dtype), 0)
    old_logp = jnp.where(valid, jnp.asarray(old_logprobs).astype(dtype), 0)
    advantages = jnp.asarray(advantages).astype(dtype)
    lengths = weights.sum(axis=-1)
    safe_lengths = jnp.maximum(lengths, 1)
    total_tokens = weights.sum()
    safe_total = jnp.maximum(total_tokens, 1)

    def aggregate(per_token: jax.Array) -> jax.Array:
        """Reduce a [B, N] per-token term (zero where masked) to a scalar as `aggregation` says."""
        if aggregation == "sequence_mean":
            return (per_token.sum(axis=-1) / safe_lengths).mean()
        if aggregation == "token_mean":
            return per_token.sum() / safe_total
        return per_token.sum() / (shape[0] * max_length)

    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    if ratio_level == "token":
        surrogate_ratio = ratio
    else:
        sequence_ratio = jnp.exp(log_ratio.sum(axis=-1) / safe_lengths)
        surrogate_ratio = jnp.broadcast_to(sequence_ratio[:, None], shape)
    adv = advantages[:, None]
    unclipped = surrogate_ratio * adv
    clipped = jnp.clip(surrogate_ratio, 1 - epsilon, 1 + epsilon_high) * adv
    surrogate = jnp.minimum(unclipped, clipped)

    if off_policy_delta is None:
        keep = jnp.ones(shape[:1], dtype)
    else:
        keep = off_policy_sequence_mask(logp, old_logp, advantages, valid, off_policy_delta)
    policy_term = surrogate * keep[:, None] * weights
    policy_loss = -aggregate(policy_term)

    if ref_logprobs is not None:
        ref_logp = jnp.where(valid, jnp.asarray(ref_logprobs).astype(dtype), 0)
        log_rho = ref_logp - logp
        # The token ratio stays attached: d/dlogp of r (rho - log rho - 1) is r (logp - ref_logp).
        kl_per_token = ratio * (jnp.exp(log_rho) - log_rho - 1) * weights
        kl_mean = kl_per_token.sum() / safe_total
    else:
        kl_per_token = jnp.zeros(shape, dtype)
        kl_mean = jnp.zeros((), dtype)
    if use_kl:
        beta = jnp.asarray(kl_coef, dtype)
        beta = beta[:, None] if beta.ndim == 1 else beta
        kl_loss = aggregate(beta * kl_per_token)
    else:
        kl_loss = jnp.zeros((), dtype)
    loss = policy_loss + kl_loss

    def token_mean(x: jax.Array) -> jax.Array:
        return (x * weights).sum() / safe_total

    low = (surrogate_ratio < 1 - epsilon) & (adv < 0)
    high = (surrogate_ratio > 1 + epsilon_high) & (adv > 0)
    has_tokens = total_tokens > 0
    metrics = {
        "policy_loss": policy_loss,
        "kl_loss": kl_loss,
        "kl": kl_mean,
        "clip_fraction": token_mean((low | high).astype(dtype)),
        "clip_fraction_low": token_mean(low.astype(dtype)),
        "clip_fraction_high": token_mean(high.astype(dtype)),
        "off_policy_masked_fraction": (1 - keep).mean(),
        # Neutral 1.0 for a batch without generated tokens, instead of +-inf.
        "ratio_min": jnp.where(has_tokens, jnp.where(valid, ratio, jnp.inf).min(), 1.0),
        "ratio_max": jnp.where(has_tokens, jnp.where(valid, ratio, -jnp.inf).max(), 1.0),
        "ratio_mean": jnp.where(has_tokens, token_mean(ratio), 1.0),
        "sampler_logprob_gap": token_mean(-log_ratio),
        "mean_length": lengths.mean(),
    }
    metrics = {name: jax.lax.stop_gradient(value).astype(jnp.float32) for name, value in metrics.items()}
    return loss, metrics
