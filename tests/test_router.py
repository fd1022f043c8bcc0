"""The noaux_tc router and the dropless expert computation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model.moe import routed_experts_dense, routed_experts_gathered, routed_experts_ragged
from dsjax.model.router import Routing, route

KW = dict(top_k=2, num_groups=4, num_selected_groups=2, routed_scaling_factor=2.5, norm_topk_prob=True)


def test_hand_worked_case_groups_and_bias_both_matter():
    # 8 experts in 4 groups of 2. Biased scores: [.9 .1 | .2 .3 | .85 .05 | .7 .65]
    # group scores (sum of top 2): 1.0, 0.5, 0.9, 1.35 -> keep groups 3 and 0 -> experts {0, 1, 6, 7}
    # -> top-2 by biased score: experts 0 (0.9) and 6 (0.7), although expert 4 (0.85) beats expert 6.
    scores = np.array([[0.9, 0.1, 0.2, 0.3, 0.85, 0.05, 0.4, 0.35]], np.float32)
    bias = np.array([0, 0, 0, 0, 0, 0, 0.3, 0.3], np.float32)
    out = route(jnp.asarray(scores), jnp.asarray(bias), **KW)
    assert sorted(np.asarray(out.indices)[0].tolist()) == [0, 6]
    # Weights use the unbiased scores: s / sum(s) * 2.5.
    chosen = {int(i): float(w) for i, w in zip(np.asarray(out.indices)[0], np.asarray(out.weights)[0])}
    np.testing.assert_allclose(chosen[0], 0.9 / (0.9 + 0.4) * 2.5, rtol=1e-6)
    np.testing.assert_allclose(chosen[6], 0.4 / (0.9 + 0.4) * 2.5, rtol=1e-6)
    # Without the bias, groups 0 and 2 win and experts 0 and 4 are chosen.
    no_bias = route(jnp.asarray(scores), jnp.zeros(8), **KW)
    assert sorted(np.asarray(no_bias.indices)[0].tolist()) == [0, 4]
    # Without group limiting (one group), the biased top-2 is experts 0 and 4.
    flat = route(jnp.asarray(scores), jnp.asarray(bias), **dict(KW, num_groups=1, num_selected_groups=1))
    assert sorted(np.asarray(flat.indices)[0].tolist()) == [0, 4]


def _brute_force(scores, bias, top_k, num_groups, num_selected_groups, scale, norm):
    """Group-limited top-k by enumeration, written independently of dsjax."""
    n, e = scores.shape
    size = e // num_groups
    indices, weights = [], []
    for s, b in zip(scores, bias[None].repeat(n, 0)):
        biased = s + b
        group_score = [sum(sorted(biased[g * size:(g + 1) * size])[-2:]) for g in range(num_groups)]
        kept_groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:num_selected_groups]
        kept = [i for g in kept_groups for i in range(g * size, (g + 1) * size)]
        best = max(itertools.combinations(kept, top_k), key=lambda c: sorted(biased[list(c)].tolist(), reverse=True))
        w = s[list(best)]
        if norm:
            w = w / (w.sum() + 1e-20)
        indices.append(set(best))
        weights.append(dict(zip(best, w * scale)))
    return indices, weights


@pytest.mark.parametrize("num_groups,num_selected_groups,norm", [(4, 2, True), (1, 1, True), (4, 3, False)])
def test_matches_brute_force(num_groups, num_selected_groups, norm):
    rng = np.random.default_rng(0)
    scores = jax.nn.sigmoid(rng.normal(size=(64, 12))).astype(np.float32)
    bias = rng.normal(scale=0.1, size=12).astype(np.float32)
    kw = dict(top_k=3, num_groups=num_groups, num_selected_groups=num_selected_groups, routed_scaling_factor=2.5,
              norm_topk_prob=norm)
    out = route(jnp.asarray(scores), jnp.asarray(bias), **kw)
    want_idx, want_w = _brute_force(np.asarray(scores), bias, 3, num_groups, num_selected_groups, 2.5, norm)
    for row, (idx, w) in enumerate(zip(np.asarray(out.indices), np.asarray(out.weights))):
        assert set(idx.tolist()) == want_idx[row]
        for i, wi in zip(idx, w):
            np.testing.assert_allclose(wi, want_w[row][int(i)], rtol=1e-5)


def test_bias_gets_no_gradient_and_forced_routing_replays():
    rng = np.random.default_rng(1)
    scores = jnp.asarray(jax.nn.sigmoid(rng.normal(size=(16, 12))), jnp.float32)
    bias = jnp.asarray(rng.normal(scale=0.1, size=12), jnp.float32)
    grad = jax.grad(lambda b: route(scores, b, **dict(KW, top_k=3)).weights.sum())(bias)
    assert np.all(np.asarray(grad) == 0)
    first = route(scores, bias, **dict(KW, top_k=3))
    replay = route(scores * 0.5 + 0.2, bias, **dict(KW, top_k=3), forced_indices=first.indices)
    assert np.array_equal(np.asarray(replay.indices), np.asarray(first.indices))
    # The weights are recomputed from the new scores at the forced experts.
    s = np.take_along_axis(np.asarray(scores * 0.5 + 0.2), np.asarray(first.indices), -1)
    np.testing.assert_allclose(np.asarray(replay.weights), s / s.sum(-1, keepdims=True) * 2.5, rtol=1e-5)


@pytest.mark.parametrize("implementation", [routed_experts_ragged, routed_experts_gathered])
def test_routed_expert_implementations_equal_dense_experts_with_gradients(implementation):
    """Ragged (sorted grouped matmuls) and gathered (decode: each token's k experts' weights) against
    every expert on every token weighted by a dense combine matrix: values and gradients."""
    rng = np.random.default_rng(2)
    n, d, f, e, k = 40, 9, 7, 6, 2
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    weights = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    routing = Routing(jnp.asarray(rng.random((n, k)), jnp.float32), idx, None)

    def loss(fn, x, *w):
        return jnp.sum(jnp.sin(fn(x, routing, *w)))

    np.testing.assert_allclose(implementation(x, routing, *weights), routed_experts_dense(x, routing, *weights),
                               rtol=1e-5, atol=1e-5)
    g_ragged = jax.grad(lambda *a: loss(implementation, *a), argnums=(0, 1, 2, 3))(x, *weights)
    g_dense = jax.grad(lambda *a: loss(routed_experts_dense, *a), argnums=(0, 1, 2, 3))(x, *weights)
    for a, b in zip(g_ragged, g_dense):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
