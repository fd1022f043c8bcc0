"""Tests for dsjax.train.optim (and the optimizer config in dsjax.train.config)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dsjax.train import optim
from dsjax.train import step as step_lib
from dsjax.train.config import default_optimizer_config, validate_optimizer_config


def _cfg(**overrides):
    values = default_optimizer_config().to_dict()
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _fake_params(seed=0):
    """Small DeepSeek-like params with stacked (leading layer axis) leaves."""
    rng = np.random.default_rng(seed)
    n_layers, d, e = 3, 4, 5
    return {
        "embed": {"embedding": _normal(rng, (11, d))},
        "layers": {
            "attn_norm": {"scale": jnp.ones((n_layers, d))},
            "attn": {
                "wq": {"kernel": _normal(rng, (n_layers, d, d))},
                "q_norm": {"scale": jnp.ones((n_layers, d)),
                           "bias": jnp.zeros((n_layers, d))},
                "indexer": {"kernel": _normal(rng, (n_layers, d, 2))},
            },
            "moe": {
                "gate": {
                    "kernel": _normal(rng, (n_layers, d, e)),
                    "e_score_correction_bias": _normal(rng, (n_layers, e)),
                },
            },
        },
        "final_norm": {"scale": jnp.ones((d,))},
        "misc": {"alpha": jnp.ones((2,))},
    }


def _grads_like(params, seed, scale=1.0):
    rng = np.random.default_rng(1000 + seed)
    return jax.tree.map(lambda x: _normal(rng, x.shape, scale), params)


def _find(state, cls):
    """All nodes of type ``cls`` inside an optimizer state."""
    found = []

    def visit(node):
        if isinstance(node, cls):
            found.append(node)
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found


def _adam_state(opt_state):
    states = _find(opt_state, optax.ScaleByAdamState)
    assert len(states) == 1
    return states[0]


# ----------------------------------------------------------------- schedule


def test_warmup_cosine_key_steps():
    lr, ratio, warm, total = 3e-4, 0.1, 100, 1100
    s = optim.make_schedule(_cfg(learning_rate=lr, final_lr_ratio=ratio,
                                 warmup_steps=warm, decay_steps=total))
    final = lr * ratio
    np.testing.assert_allclose(s(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(s(warm // 2), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(s(warm), lr, rtol=1e-6)
    # Half-way through the cosine: mean of peak and final.
    np.testing.assert_allclose(s((warm + total) // 2), (lr + final) / 2,
                               rtol=1e-5)
    # A quarter: cos(pi/4) point.
    q = warm + (total - warm) // 4
    expected = final + (lr - final) * 0.5 * (1 + math.cos(math.pi / 4))
    np.testing.assert_allclose(s(q), expected, rtol=1e-5)
    np.testing.assert_allclose(s(total), final, rtol=1e-5)
    np.testing.assert_allclose(s(10 * total), final, rtol=1e-5)
    # Monotone decay after the peak.
    vals = np.array([float(s(t)) for t in range(warm, total + 1, 50)])
    assert np.all(np.diff(vals) <= 1e-12)


def test_constant_schedule():
    s = optim.make_schedule(_cfg(schedule="constant", learning_rate=1e-3,
                                 warmup_steps=10))
    np.testing.assert_allclose(s(5), 5e-4, rtol=1e-6)
    for t in (10, 1000, 10**7):
        np.testing.assert_allclose(s(t), 1e-3, rtol=1e-6)
    s0 = optim.make_schedule(_cfg(schedule="constant", learning_rate=1e-3,
                                  warmup_steps=0))
    np.testing.assert_allclose(s0(0), 1e-3, rtol=1e-6)


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_plateau_and_decay(shape):
    lr, ratio, warm, total, frac = 1e-3, 0.05, 50, 1000, 0.2
    s = optim.make_schedule(_cfg(schedule="wsd", learning_rate=lr,
                                 final_lr_ratio=ratio, warmup_steps=warm,
                                 decay_steps=total, wsd_decay_fraction=frac,
                                 wsd_decay_shape=shape))
    final = lr * ratio
    start = total - int(round(frac * total))  # 800
    np.testing.assert_allclose(s(warm // 2), lr / 2, rtol=1e-6)
    # Plateau.
    for t in (warm, (warm + start) // 2, start):
        np.testing.assert_allclose(s(t), lr, rtol=1e-6)
    # Decay phase.
    for t in (start + 25, (start + total) // 2, total - 10):
        frac_done = (t - start) / (total - start)
        if shape == "sqrt":
            frac_done = math.sqrt(frac_done)
        np.testing.assert_allclose(s(t), final + (lr - final) * (1 - frac_done),
                                   rtol=1e-5)
    np.testing.assert_allclose(s(total), final, rtol=1e-5)
    np.testing.assert_allclose(s(total + 12345), final, rtol=1e-5)


def test_sqrt_and_linear_differ():
    kw = dict(schedule="wsd", warmup_steps=0, decay_steps=100)
    lin = optim.make_schedule(_cfg(wsd_decay_shape="linear", **kw))
    sq = optim.make_schedule(_cfg(wsd_decay_shape="sqrt", **kw))
    assert float(sq(90)) < float(lin(90))


def test_default_config_values():
    cfg = default_optimizer_config()
    assert cfg.learning_rate == 2.2e-4
    assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.95, 1e-8)
    assert cfg.weight_decay == 0.1 and cfg.grad_clip == 1.0
    assert cfg.schedule == "warmup_cosine"
    assert (cfg.warmup_steps, cfg.decay_steps) == (2000, 100000)
    assert cfg.final_lr_ratio == 0.1
    assert cfg.wsd_decay_fraction == 0.2 and cfg.wsd_decay_shape == "linear"
    assert cfg.accumulation_steps == 1
    validate_optimizer_config(cfg)


@pytest.mark.parametrize("key,value", [
    ("schedule", "linear_warmup"),
    ("warmup_steps", -1),
    ("decay_steps", -5),
    ("learning_rate", -1e-3),
    ("b2", 1.0),
    ("final_lr_ratio", 1.5),
    ("wsd_decay_shape", "cubic"),
    ("wsd_decay_fraction", 2.0),
    ("accumulation_steps", 0),
    ("grad_clip", -1.0),
    ("warmup_steps", 2.5),
])
def test_bad_config_raises(key, value):
    with pytest.raises(ValueError, match=rf"optimizer\.{key}\b"):
        optim.make_schedule(_cfg(**{key: value}))


def test_decay_before_warmup_raises():
    with pytest.raises(ValueError, match=r"optimizer\.decay_steps"):
        optim.make_optimizer(_cfg(warmup_steps=100, decay_steps=50),
                             _fake_params())


# ---------------------------------------------------------------- masks


def test_weight_decay_mask():
    mask = optim.weight_decay_mask(_fake_params())
    assert mask == {
        "embed": {"embedding": True},
        "layers": {
            "attn_norm": {"scale": False},
            "attn": {
                "wq": {"kernel": True},
                "q_norm": {"scale": False, "bias": False},
                "indexer": {"kernel": True},
            },
            "moe": {"gate": {"kernel": True,
                             "e_score_correction_bias": False}},
        },
        "final_norm": {"scale": False},
        "misc": {"alpha": False},
    }
    # Works on abstract params too.
    abstract = jax.eval_shape(_fake_params)
    assert optim.weight_decay_mask(abstract) == mask


def test_weight_decay_applied_only_to_masked_leaves():
    # Zero gradients: AdamW's update is then exactly -lr * wd * param on decayed
    # leaves and zero elsewhere.
    params = _fake_params()
    lr, wd = 0.01, 0.5
    tx = optim.make_optimizer(
        _cfg(schedule="constant", warmup_steps=0, learning_rate=lr,
             weight_decay=wd), params)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, state, params)
    mask = optim.weight_decay_mask(params)
    for u, p, m in zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                       jax.tree.leaves(mask)):
        expected = -lr * wd * p if m else jnp.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------- optimizer


def _run(tx, params, n_steps, seed=1, grad_scale=1.0):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(n_steps):
        grads = _grads_like(params, seed + i, grad_scale)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_router_bias_never_updated():
    params = _fake_params()
    tx = optim.make_optimizer(
        _cfg(schedule="constant", warmup_steps=0, learning_rate=0.1), params)
    new_params, state = _run(tx, params, 4)
    bias = params["layers"]["moe"]["gate"]["e_score_correction_bias"]
    new_bias = new_params["layers"]["moe"]["gate"]["e_score_correction_bias"]
    np.testing.assert_array_equal(new_bias, bias)
    # The neighbouring router kernel did move.
    assert not np.allclose(new_params["layers"]["moe"]["gate"]["kernel"],
                           params["layers"]["moe"]["gate"]["kernel"])
    # And no Adam moments are kept for the bias.
    adam = _adam_state(state)
    assert isinstance(adam.mu["layers"]["moe"]["gate"]["e_score_correction_bias"],
                      optax.MaskedNode)
    assert isinstance(adam.nu["layers"]["moe"]["gate"]["e_score_correction_bias"],
                      optax.MaskedNode)


@pytest.mark.parametrize("as_callable", [False, True])
def test_frozen_leaves(as_callable):
    params = _fake_params()
    if as_callable:
        trainable = lambda path: "indexer" in path  # pylint: disable=unnecessary-lambda-assignment
    else:
        trainable = jax.tree_util.tree_map_with_path(
            lambda path, _: any(getattr(k, "key", None) == "indexer" for k in path),
            params)
    tx = optim.make_optimizer(
        _cfg(schedule="constant", warmup_steps=0, learning_rate=0.1), params,
        trainable=trainable)
    new_params, state = _run(tx, params, 3)
    flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_new = jax.tree.leaves(new_params)
    n_changed = 0
    for (path, old), new in zip(flat_old, flat_new):
        names = [getattr(k, "key", None) for k in path]
        if "indexer" in names:
            assert not np.allclose(old, new)
            n_changed += 1
        else:
            np.testing.assert_array_equal(old, new)
    assert n_changed == 1
    adam = _adam_state(state)
    mu_arrays = jax.tree.leaves(adam.mu)
    nu_arrays = jax.tree.leaves(adam.nu)
    # Only the indexer kernel has moments.
    assert len(mu_arrays) == 1 and len(nu_arrays) == 1
    assert mu_arrays[0].shape == params["layers"]["attn"]["indexer"]["kernel"].shape
    assert isinstance(adam.mu["layers"]["attn"]["wq"]["kernel"], optax.MaskedNode)


def test_clip_uses_trainable_global_norm():
    params = _fake_params()
    clip, b1 = 0.5, 0.9
    is_trainable = lambda path: "wq" in path or "indexer" in path  # pylint: disable=unnecessary-lambda-assignment
    tx = optim.make_optimizer(
        _cfg(schedule="constant", warmup_steps=0, grad_clip=clip, b1=b1),
        params, trainable=is_trainable)
    grads = _grads_like(params, 7, scale=3.0)
    # A huge gradient on a frozen leaf must not influence the clipping factor.
    grads["layers"]["attn_norm"]["scale"] = 1e6 * jnp.ones_like(
        grads["layers"]["attn_norm"]["scale"])
    trainable_grads = [grads["layers"]["attn"]["wq"]["kernel"],
                       grads["layers"]["attn"]["indexer"]["kernel"]]
    norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in trainable_grads))
    assert norm > clip  # clipping is active
    factor = clip / norm
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    mu = _adam_state(state).mu
    # First Adam step: mu = (1 - b1) * clipped_grad.
    np.testing.assert_allclose(mu["layers"]["attn"]["wq"]["kernel"],
                               (1 - b1) * factor * trainable_grads[0], rtol=1e-5)
    np.testing.assert_allclose(mu["layers"]["attn"]["indexer"]["kernel"],
                               (1 - b1) * factor * trainable_grads[1], rtol=1e-5)


def test_no_clip_when_disabled():
    params = _fake_params()
    for clip in (0.0, None):
        tx = optim.make_optimizer(
            _cfg(schedule="constant", warmup_steps=0, grad_clip=clip), params)
        grads = _grads_like(params, 3, scale=100.0)
        _, state = jax.jit(tx.update)(grads, tx.init(params), params)
        np.testing.assert_allclose(
            _adam_state(state).mu["layers"]["attn"]["wq"]["kernel"],
            0.1 * grads["layers"]["attn"]["wq"]["kernel"], rtol=1e-5)


# (grad_clip, eps): with clipping active the clip must act on the mean
# gradient; with a large eps Adam is not scale-invariant, so a sum instead of a
# mean of the micro-batch gradients would show.
@pytest.mark.parametrize("clip,eps", [(1.0, 1e-8), (0.0, 0.5)])
def test_accumulation_equals_mean_gradient_step(clip, eps):
    """The train step's k micro-batches make one optimizer step on the mean of their gradients."""
    params = _fake_params()
    k = 4
    tx = optim.make_optimizer(_cfg(schedule="warmup_cosine", warmup_steps=2, decay_steps=20,
                                   learning_rate=1e-2, grad_clip=clip, eps=eps), params)

    def linear_loss(p, frozen, batch, rng):
        """Its gradient is the micro-batch's one row of ``batch`` (a tree like the params)."""
        del frozen, rng
        return sum(jnp.sum(x * g[0]) for x, g in zip(jax.tree.leaves(p), jax.tree.leaves(batch))), {}, {}

    step = step_lib.make_train_step(linear_loss, tx, accumulation_steps=k)
    state = step_lib.init_train_state(jax.tree.map(jnp.array, params), tx)
    p_one, s_one = params, tx.init(params)
    upd_one = jax.jit(tx.update)
    for outer in range(3):  # 3 optimizer steps (warm-up then cosine)
        micro = [_grads_like(params, 100 * outer + i) for i in range(k)]
        state, _ = step(state, jax.tree.map(lambda *g: jnp.stack(g), *micro))
        mean_g = jax.tree.map(lambda *xs: sum(xs) / k, *micro)
        u, s_one = upd_one(mean_g, s_one, p_one)
        p_one = optax.apply_updates(p_one, u)
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(p_one)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        for a, b in zip(jax.tree.leaves(_adam_state(state["opt_state"]).mu),
                        jax.tree.leaves(_adam_state(s_one).mu)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # The parameters did move (lr > 0 after the first step).
    assert not np.allclose(p_one["layers"]["attn"]["wq"]["kernel"],
                           params["layers"]["attn"]["wq"]["kernel"])
    np.testing.assert_array_equal(
        state["params"]["layers"]["moe"]["gate"]["e_score_correction_bias"],
        params["layers"]["moe"]["gate"]["e_score_correction_bias"])
