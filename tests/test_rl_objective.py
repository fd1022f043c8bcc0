"""GRPO objective against a float64 brute force written with plain loops, values and gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.rl import group_advantages, grpo_loss

EPS, EPS_HIGH, DELTA = 0.2, 0.3, 0.5
LENGTHS = [9, 5, 0, 3, 9, 1, 6, 7]
ADVANTAGES = [1.0, -0.8, 0.3, -0.5, 0.7, 0.4, -1.2, 0.6]
KL_COEF = [0.1, 0.0, 0.05, 0.2, 0.0, 0.1, 0.15, 0.05]


def brute_force_loss(logp, old, ref, adv, mask, *, eps=EPS, eps_high=EPS_HIGH, beta=0.0, delta=None,
                     aggregation="sequence_mean", max_length=None, ratio_level="token", kl_ratio_logp=None):
    """-J of the V3.2 report, one token at a time. kl_ratio_logp, if given, freezes r in the KL term."""
    rows, cols = logp.shape
    betas = [beta] * rows if np.ndim(beta) == 0 else list(beta)
    total, token_count, per_row_means = 0.0, 0, []
    for i in range(rows):
        tokens = [t for t in range(cols) if mask[i, t] > 0]
        length = len(tokens)
        drift = sum(old[i, t] - logp[i, t] for t in tokens) / max(length, 1)
        keep = 0.0 if (delta is not None and adv[i] < 0 and drift > delta) else 1.0
        seq_ratio = math.exp(-drift)
        row_sum = 0.0
        for t in tokens:
            ratio = math.exp(logp[i, t] - old[i, t])
            x = seq_ratio if ratio_level == "sequence" else ratio
            surrogate = min(x * adv[i], min(max(x, 1 - eps), 1 + eps_high) * adv[i])
            kl = 0.0
            if betas[i] != 0:
                rho = math.exp(ref[i, t] - logp[i, t])
                kl_ratio = ratio if kl_ratio_logp is None else math.exp(kl_ratio_logp[i, t] - old[i, t])
                kl = kl_ratio * (rho - math.log(rho) - 1)
            row_sum += surrogate * keep - betas[i] * kl
        total += row_sum
        token_count += length
        per_row_means.append(row_sum / length if length else 0.0)
    if aggregation == "sequence_mean":
        objective = sum(per_row_means) / rows
    elif aggregation == "token_mean":
        objective = total / token_count
    else:
        objective = total / (rows * max_length)
    return -objective


def brute_force_metrics(logp, old, ref, adv, mask, *, eps=EPS, eps_high=EPS_HIGH, delta=DELTA):
    ratios, clipped, kls, masked = [], 0, [], 0
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        drift = sum(old[i, t] - logp[i, t] for t in tokens) / max(len(tokens), 1)
        masked += adv[i] < 0 and drift > delta
        for t in tokens:
            r = math.exp(logp[i, t] - old[i, t])
            ratios.append(r)
            clipped += (r > 1 + eps_high and adv[i] > 0) or (r < 1 - eps and adv[i] < 0)
            rho = math.exp(ref[i, t] - logp[i, t])
            kls.append(r * (rho - math.log(rho) - 1))
    return dict(ratio_min=min(ratios), ratio_max=max(ratios), ratio_mean=np.mean(ratios),
                clip_fraction=clipped / len(ratios), kl=np.mean(kls), off_policy_masked_fraction=masked / logp.shape[0])


def finite_difference_grad(fn, logp, mask, h=1e-6):
    grad = np.zeros_like(logp)
    for i, t in zip(*np.nonzero(mask)):
        up, down = logp.copy(), logp.copy()
        up[i, t] += h
        down[i, t] -= h
        grad[i, t] = (fn(up) - fn(down)) / (2 * h)
    return grad


def make_batch(seed=0):
    """Rows built to hit every branch: see the comments; float64 numpy arrays plus garbage padding."""
    rng = np.random.default_rng(seed)
    rows, cols = len(LENGTHS), max(LENGTHS)
    mask = (np.arange(cols)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float64)
    logp = rng.uniform(-3.0, -0.1, (rows, cols))
    log_ratio = rng.normal(0.0, 0.3, (rows, cols))          # rows 0, 3: spread across all clip bands
    # Row 1: A < 0 and drift ~1.2 > delta, so masked; its near-1 ratios would otherwise get a gradient.
    log_ratio[1, :5] = np.array([-3.0, 0.05, -3.0, 0.1, -0.05]) + rng.normal(0.0, 0.01, 5)
    log_ratio[4] = math.log(1.25) + rng.normal(0.0, 0.01, cols)  # between 1 + eps and 1 + eps_high
    log_ratio[5] = 0.5                                      # A > 0, above 1 + eps_high: clipped
    log_ratio[6] = -0.2 + rng.normal(0.0, 0.05, cols)       # A < 0, drift 0.2 < delta: kept
    log_ratio[7] = -0.9 + rng.normal(0.0, 0.05, cols)       # A > 0, drift 0.9 > delta: kept
    old = logp - log_ratio
    ref = logp + rng.normal(0.0, 0.3, (rows, cols))
    return logp, old, ref, np.array(ADVANTAGES), mask


def with_garbage(x, mask, fill):
    return np.where(mask > 0, x, fill)


def assert_away_from_kinks(logp, old, adv, mask, h=1e-6):
    """Finite differences are only valid where no clip bound or mask threshold is within reach."""
    bounds = [math.log(1 - EPS), math.log(1 + EPS_HIGH)]
    for i in range(logp.shape[0]):
        tokens = mask[i] > 0
        if not tokens.any():
            continue
        log_ratio = logp[i][tokens] - old[i][tokens]
        for bound in bounds:
            assert np.abs(log_ratio - bound).min() > 100 * h
            assert abs(log_ratio.mean() - bound) > 100 * h
        assert abs(-log_ratio.mean() - DELTA) > 100 * h


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "fixed_length"])
def test_matches_brute_force_values_gradients_and_metrics(aggregation, ratio_level):
    logp, old, ref, adv, mask = make_batch()
    assert_away_from_kinks(logp, old, adv, mask)
    options = dict(aggregation=aggregation, max_length=12 if aggregation == "fixed_length" else None,
                   ratio_level=ratio_level)

    # The batch really exercises the cases it claims to.
    assert 0 in LENGTHS and len(set(LENGTHS)) > 3
    token_ratio = np.exp(logp - old)[mask > 0]
    assert ((token_ratio > 1 + EPS) & (token_ratio < 1 + EPS_HIGH)).sum() >= 5
    seq_ratio = np.exp(((logp - old) * mask).sum(1) / np.maximum(mask.sum(1), 1))
    assert 1 + EPS < seq_ratio[4] < 1 + EPS_HIGH
    expected = brute_force_metrics(logp, old, ref, adv, mask)
    assert 0 < expected["off_policy_masked_fraction"] < 0.5

    def reference(x):
        return brute_force_loss(x, old, ref, adv, mask, beta=KL_COEF, delta=DELTA, **options)

    jax_args = (with_garbage(old, mask, 1e30), with_garbage(ref, mask, np.nan), adv, mask)
    kwargs = dict(epsilon=EPS, epsilon_high=EPS_HIGH, off_policy_delta=DELTA, **options)
    with jax.enable_x64(True):
        def loss_fn(x):
            return grpo_loss(x, *jax_args, kl_coef=jnp.asarray(KL_COEF), **kwargs)

        padded_logp = jnp.asarray(with_garbage(logp, mask, -np.inf))
        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(padded_logp)
        loss, grad = float(loss), np.asarray(grad)
    np.testing.assert_allclose(loss, reference(logp), rtol=1e-12)
    assert np.isfinite(grad).all() and (grad[mask == 0] == 0).all()
    np.testing.assert_allclose(grad, finite_difference_grad(reference, logp, mask), rtol=1e-5, atol=1e-9)
    for name, value in expected.items():
        if ratio_level == "sequence" and name == "clip_fraction":
            continue  # clipping then acts on the sequence ratio; checked below
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-6, err_msg=name)
        assert metrics[name].dtype == jnp.float32
    np.testing.assert_allclose(float(metrics["policy_loss"] + metrics["kl_loss"]), loss, rtol=1e-6)

    # The float32 path, without x64, agrees to float32 accuracy.
    loss32, _ = grpo_loss(jnp.asarray(logp, jnp.float32), *(jnp.asarray(a, jnp.float32) for a in jax_args),
                          kl_coef=jnp.asarray(KL_COEF, jnp.float32), **kwargs)
    assert loss32.dtype == jnp.float32
    np.testing.assert_allclose(float(loss32), reference(logp), rtol=2e-5, atol=1e-6)


def test_sequence_level_clip_fraction_counts_tokens_of_clipped_sequences():
    logp, old, ref, adv, mask = make_batch()
    _, metrics = grpo_loss(logp, old, ref, adv, mask, epsilon=EPS, epsilon_high=EPS_HIGH, ratio_level="sequence")
    seq_ratio = np.exp(((logp - old) * mask).sum(1) / np.maximum(mask.sum(1), 1))
    clipped_rows = ((seq_ratio > 1 + EPS_HIGH) & (adv > 0)) | ((seq_ratio < 1 - EPS) & (adv < 0))
    assert clipped_rows.any()
    np.testing.assert_allclose(float(metrics["clip_fraction"]), (mask.sum(1) * clipped_rows).sum() / mask.sum(),
                               rtol=1e-6)


def test_off_policy_mask_drops_the_drifted_negative_row_and_no_gradient_flows_through_it():
    logp, old, ref, adv, mask = make_batch()
    with jax.enable_x64(True):
        grad = jax.grad(lambda x: grpo_loss(x, old, ref, adv, mask, off_policy_delta=DELTA)[0])(jnp.asarray(logp))
        unmasked_grad = jax.grad(lambda x: grpo_loss(x, old, ref, adv, mask)[0])(jnp.asarray(logp))
    assert (np.asarray(grad)[1] == 0).all()                  # row 1: A < 0 and drift > delta
    assert np.abs(np.asarray(unmasked_grad)[1]).max() > 1e-3  # ... which the mask alone removes
    np.testing.assert_array_equal(np.asarray(grad)[[0, 3, 4, 6, 7]], np.asarray(unmasked_grad)[[0, 3, 4, 6, 7]])


def test_kl_gradient_keeps_the_ratio_attached():
    """With A = 0 only the KL term moves: its gradient is r (logp - ref), not the detached r (1 - rho)."""
    logp, old, _, _, mask = make_batch(seed=1)
    # A reference far enough away that the two derivatives differ beyond first order in (logp - ref).
    ref = logp + np.random.default_rng(2).normal(0.0, 1.0, logp.shape)
    zero_adv = np.zeros(len(LENGTHS))

    def attached(x):
        return brute_force_loss(x, old, ref, zero_adv, mask, beta=0.5)

    def detached(x):
        return brute_force_loss(x, old, ref, zero_adv, mask, beta=0.5, kl_ratio_logp=logp)

    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(lambda x: grpo_loss(x, old, ref, zero_adv, mask, kl_coef=0.5)[0])(jnp.asarray(logp)))
    expected = finite_difference_grad(attached, logp, mask)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)
    # Closed form of the attached derivative: d/dlogp [r (rho - log rho - 1)] = r (logp - ref).
    lengths = np.maximum(mask.sum(1, keepdims=True), 1)
    closed_form = 0.5 * np.exp(logp - old) * (logp - ref) * mask / lengths / len(LENGTHS)
    np.testing.assert_allclose(grad, closed_form, rtol=1e-9, atol=1e-12)
    detached_grad = finite_difference_grad(detached, logp, mask)
    assert np.abs(grad - detached_grad).max() > 0.2 * np.abs(grad).max()


def test_on_policy_ratios_are_exactly_one():
    logp, _, ref, adv, mask = make_batch()
    loss, metrics = grpo_loss(logp, logp, ref, adv, mask, epsilon=EPS, kl_coef=0.1, off_policy_delta=0.0)
    for name in ("ratio_min", "ratio_max", "ratio_mean"):
        assert float(metrics[name]) == 1.0, name
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["off_policy_masked_fraction"]) == 0.0
    assert float(metrics["sampler_logprob_gap"]) == 0.0
    # On-policy, the policy gradient is the plain REINFORCE one: -A_i / (B |o_i|) per token.
    grad = jax.grad(lambda x: grpo_loss(x, logp, None, adv, mask)[0])(jnp.asarray(logp, jnp.float32))
    lengths = np.maximum(mask.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(np.asarray(grad), -adv[:, None] * mask / lengths / len(LENGTHS), rtol=1e-6)


def test_empty_batch_and_empty_rows_give_finite_results():
    rows, cols = 3, 4
    zeros = jnp.zeros((rows, cols))
    loss, metrics = grpo_loss(zeros, zeros, zeros, jnp.ones(rows), zeros, kl_coef=0.1, aggregation="token_mean")
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    grad = jax.grad(lambda x: grpo_loss(x, zeros, zeros, -jnp.ones(rows), zeros, off_policy_delta=0.1)[0])(zeros)
    assert (np.asarray(grad) == 0).all()


def test_jit_and_argument_checks():
    logp, old, ref, adv, mask = make_batch()
    eager, _ = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1, off_policy_delta=DELTA)
    jitted = jax.jit(lambda *a: grpo_loss(*a, kl_coef=0.1, off_policy_delta=DELTA)[0])(logp, old, ref, adv, mask)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="max_length"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="fixed_length")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, old, None, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="ratio_level"):
        grpo_loss(logp, old, ref, adv, mask, ratio_level="group")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, adv[:3], mask)


@pytest.mark.parametrize("scale", ["none", "group_std", "batch_std"])
def test_group_advantages_matches_numpy(scale):
    rewards = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    rewards[2] = 0.5  # a constant group: no signal, and no division by zero
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if scale == "none":
        expected = centred
    elif scale == "group_std":
        expected = centred / (rewards.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    else:
        expected = centred / (rewards.std(ddof=1) + 1e-6)
    got = np.asarray(group_advantages(rewards, scale=scale))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[2] == 0).all()
    single = np.asarray(group_advantages(np.ones((3, 1)), scale=scale))
    assert np.isfinite(single).all() and (single == 0).all()


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(np.zeros((2, 2)), scale="std")
    with pytest.raises(ValueError, match="num_prompts"):
        group_advantages(np.zeros(4))
