"""Tests for the training loop: losses, router-bias balancing, NaN stop, CLI run, kill -9 resume."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dsjax import checkpoint as ckpt
from dsjax.model import forward, init_params, make_config
from dsjax.model.router import router_bias_paths, update_router_biases
from dsjax.recipes import losses, pretrain
from dsjax.train import config as config_lib
from dsjax.train import init as init_lib
from dsjax.train import loop, metrics, optim
from dsjax.train import step as step_lib
from dsjax.train.config import default_optimizer_config
from dsjax.train.recipe import Recipe
from sigkill import kill_once_saved

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The smallest model with every part the loss touches: MLA, a dense and an MoE layer, one MTP
# module (same fields as configs/smoke.py).
TINY = dict(hidden_size=32, num_layers=2, num_mtp_layers=1, dense_intermediate_size=48, moe_intermediate_size=16)


def _tiny_config(**overrides):
    return make_config("tiny_v3", **{**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny_params():
    """Initial params of the tiny model (initialising compiles the forward pass: do it once)."""
    config = _tiny_config()
    return jax.jit(lambda rng: init_params(config, rng))(jax.random.key(0))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------ loss pieces


def test_cross_entropy_is_a_mean_over_kept_positions_only():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 7))
    mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0
    logp = _log_softmax(logits)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    expected = -(picked * mask).sum() / mask.sum()
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Whatever sits at masked positions (even infinite logits) changes nothing.
    wild = logits.copy()
    wild[mask == 0] = np.inf
    got_wild = float(losses.cross_entropy(jnp.asarray(wild), jnp.asarray(targets), jnp.asarray(mask)))
    np.testing.assert_allclose(got_wild, expected, rtol=1e-5)
    # An empty mask gives 0, not NaN.
    assert float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((3, 7)))) == 0.0


def _packed_rows(rng, batch, length):
    """Random packed rows: documents of random lengths, then padding (segment 0)."""
    segment_ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        pos, seg = 0, 1
        end = length - rng.integers(0, 5)
        while pos < end:
            n = int(rng.integers(1, 7))
            segment_ids[b, pos:min(pos + n, end)] = seg
            pos += n
            seg += 1
    tokens = rng.integers(3, 50, (batch, length)).astype(np.int32)
    has_next = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = np.where(has_next, tokens[:, 1:], 0)
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, :-1] = has_next
    return tokens, targets, segment_ids, loss_mask


def _mtp_brute_force(tokens, segment_ids, loss_mask, module):
    batch, length = tokens.shape
    want_t = np.zeros((batch, length), np.int64)
    want_m = np.zeros((batch, length), np.float32)
    for b in range(batch):
        for i in range(length):
            last = i + module + 2  # the token module `module` predicts from position i
            if last >= length:
                continue
            chain = segment_ids[b, i:last + 1]
            if chain[0] != 0 and np.all(chain == chain[0]) and loss_mask[b, last - 1] > 0:
                want_m[b, i] = 1.0
                want_t[b, i] = tokens[b, last]
    return want_t, want_m


@pytest.mark.parametrize("hide_some", [False, True])
def test_mtp_targets_match_brute_force(hide_some):
    rng = np.random.default_rng(1 + hide_some)
    tokens, targets, segment_ids, loss_mask = _packed_rows(rng, 5, 29)
    if hide_some:  # e.g. prompt tokens hidden from the loss: segments stay, targets vanish
        loss_mask = loss_mask * (rng.random(loss_mask.shape) < 0.7)
    for module in range(3):
        got_t, got_m = losses.mtp_targets(jnp.asarray(targets), jnp.asarray(loss_mask), jnp.asarray(segment_ids),
                                          module)
        want_t, want_m = _mtp_brute_force(tokens, segment_ids, loss_mask, module)
        np.testing.assert_array_equal(np.asarray(got_m), want_m)
        assert want_m.sum() > 0
        np.testing.assert_array_equal(np.asarray(got_t)[want_m > 0], want_t[want_m > 0])


def _packed_batch(seed=0, batch=4, length=32):
    tokens, targets, segment_ids, loss_mask = _packed_rows(np.random.default_rng(seed), batch, length)
    positions = np.zeros_like(segment_ids)
    for b in range(batch):
        for i in range(1, length):
            positions[b, i] = positions[b, i - 1] + 1 if segment_ids[b, i] == segment_ids[b, i - 1] else 0
    return dict(tokens=tokens, targets=targets, segment_ids=segment_ids, positions=positions, loss_mask=loss_mask)


@jax.jit
def _forward_and_loss(params, batch, mtp_loss_weight, balance_loss_alpha):
    config = ml_collections.FrozenConfigDict(_tiny_config())
    out = forward(params, batch["tokens"], config, segment_ids=batch["segment_ids"], positions=batch["positions"])
    return out, pretrain.pretraining_loss(params, batch, config, mtp_loss_weight=mtp_loss_weight,
                                          balance_loss_alpha=balance_loss_alpha)


def test_pretraining_loss_terms_and_weights(tiny_params):
    params = tiny_params
    batch = _packed_batch()
    w, alpha = 0.37, 0.05
    out, (loss, got, aux) = _forward_and_loss(params, batch, w, alpha)
    mask = batch["loss_mask"]
    logp = _log_softmax(out.logits)
    lm = -(np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * mask).sum() / mask.sum()
    t1, m1 = _mtp_brute_force(batch["tokens"], batch["segment_ids"], mask, 0)
    logp1 = _log_softmax(out.mtp_logits[0])
    mtp = -(np.take_along_axis(logp1, t1[..., None], -1)[..., 0] * m1).sum() / m1.sum()
    balance = float(np.sum(out.aux["moe_layers"]["balance_loss"]) + np.sum(out.aux["mtp_0"]["balance_loss"]))

    np.testing.assert_allclose(float(got["lm_loss"]), lm, rtol=1e-5)
    np.testing.assert_allclose(float(got["mtp_loss"]), mtp, rtol=1e-5)
    np.testing.assert_allclose(float(got["balance_loss"]), balance, rtol=1e-5)
    np.testing.assert_allclose(float(loss), lm + w * mtp + alpha * balance, rtol=1e-5)
    np.testing.assert_allclose(float(got["loss"]), float(loss), rtol=0)
    assert set(aux) == {"moe_layers", "mtp_0"}


# ------------------------------------------------------------------ router biases


def _toy_params():
    rng = np.random.default_rng(3)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return {
        "embed": {"embedding": normal(5, 4)},
        "moe_layers": {"mlp": {"router": {"kernel": normal(2, 4, 6), "e_score_correction_bias": normal(2, 6)},
                               "experts": {"kernel": normal(2, 6, 4)}}},
        "mtp_0": {"layer": {"mlp": {"router": {"kernel": normal(4, 6), "e_score_correction_bias": normal(6)}}}},
    }


def test_router_bias_sign_rule_touches_only_router_biases():
    params = _toy_params()
    loads = {"moe_layers": jnp.asarray([[4., 4., 4., 4., 4., 4.], [9., 1., 5., 5., 2., 8.]]),
             "mtp_0": jnp.asarray([0., 6., 3., 3., 3., 3.])}
    new = update_router_biases(params, loads, 0.25)
    old_b = np.asarray(params["moe_layers"]["mlp"]["router"]["e_score_correction_bias"])
    new_b = np.asarray(new["moe_layers"]["mlp"]["router"]["e_score_correction_bias"])
    # layer 0 is perfectly balanced: no move; layer 1 (mean 5): over-loaded experts go down.
    np.testing.assert_allclose(new_b - old_b, [[0, 0, 0, 0, 0, 0], [-.25, .25, 0, 0, .25, -.25]], atol=1e-7)
    old_m = np.asarray(params["mtp_0"]["layer"]["mlp"]["router"]["e_score_correction_bias"])
    new_m = np.asarray(new["mtp_0"]["layer"]["mlp"]["router"]["e_score_correction_bias"])
    np.testing.assert_allclose(new_m - old_m, [.25, -.25, 0, 0, 0, 0], atol=1e-7)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "e_score_correction_bias" not in jax.tree_util.keystr(path):
            other = new
            for key in path:
                other = other[key.key]
            np.testing.assert_array_equal(np.asarray(other), np.asarray(leaf))
    assert update_router_biases(params, loads, 0.0) is params
    with pytest.raises(ValueError, match="no e_score_correction_bias"):
        update_router_biases(params, {"dense_layers": loads["mtp_0"]}, 0.1)
    assert router_bias_paths(params)["mtp_0"] == ("mtp_0", "layer", "mlp", "router", "e_score_correction_bias")


def _toy_loss(params, frozen, batch, rng):
    """A linear 'router' regression whose aux reports an expert load that depends on the batch."""
    del frozen
    scores = batch["x"] @ params["moe"]["router"]["kernel"]  # [b, E]
    noise = jax.random.normal(rng, scores.shape) * 1e-3  # the per-micro-batch rng reaches the loss
    loss = jnp.mean((scores + noise - batch["y"]) ** 2)
    biased = jax.lax.stop_gradient(scores) + params["moe"]["router"]["e_score_correction_bias"]
    load = jax.nn.one_hot(jnp.argmax(biased, -1), scores.shape[-1]).sum(0)
    return loss, dict(loss=loss, rows=jnp.asarray(batch["x"].shape[0], jnp.float32)), dict(moe=dict(expert_load=load))


def test_accumulation_is_one_step_on_the_mean_gradient_with_summed_loads():
    rng = np.random.default_rng(5)
    params = {"moe": {"router": {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
                                 "e_score_correction_bias": jnp.asarray(rng.standard_normal(4) * 0.1, jnp.float32)}}}
    batch = dict(x=jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
                 y=jnp.asarray(rng.standard_normal((6, 4)), jnp.float32))
    opt_cfg = default_optimizer_config()
    opt_cfg.update(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    tx = optim.make_optimizer(opt_cfg, params)
    gamma, k, seed = 0.125, 3, 7
    step = step_lib.make_train_step(_toy_loss, tx, seed=seed, accumulation_steps=k, router_bias_update_rate=gamma,
                                    schedule=optim.make_schedule(opt_cfg), jit=False)
    state = step_lib.init_train_state(jax.tree.map(jnp.array, params), tx)
    new_state, m = step(state, batch)

    # By hand: micro-batch i = rows 2i, 2i+1 with key fold_in(fold_in(step_key, 0), i).
    step_rng = jax.random.fold_in(jax.random.split(jax.random.key(seed))[1], 0)
    grads, losses_, load = [], [], 0
    for i in range(k):
        micro = jax.tree.map(lambda x, i=i: x[2 * i:2 * i + 2], batch)
        (loss, (_, aux)), g = jax.value_and_grad(lambda p: (lambda r: (r[0], r[1:]))(
            _toy_loss(p, {}, micro, jax.random.fold_in(step_rng, i))), has_aux=True)(params)
        grads.append(g)
        losses_.append(float(loss))
        load = load + np.asarray(aux["moe"]["expert_load"])
    mean_grad = jax.tree.map(lambda *g: sum(g) / k, *grads)
    updates, _ = tx.update(mean_grad, tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new_state["params"]["moe"]["router"]["kernel"], expected["moe"]["router"]["kernel"],
                               rtol=1e-6)
    bias_step = np.asarray(new_state["params"]["moe"]["router"]["e_score_correction_bias"]) - np.asarray(
        params["moe"]["router"]["e_score_correction_bias"])
    np.testing.assert_allclose(bias_step, gamma * np.sign(load.mean() - load), atol=1e-7)
    assert np.count_nonzero(bias_step) > 0 and load.sum() == 6
    np.testing.assert_allclose(float(m["loss"]), np.mean(losses_), rtol=1e-6)
    np.testing.assert_allclose(float(m["rows"]), 2.0)  # metrics are micro-batch means
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.global_norm(mean_grad)), rtol=1e-6)
    np.testing.assert_allclose(float(m["lr"]), 0.1)
    np.testing.assert_allclose(float(m["expert_load_max_over_mean"]), load.max() / load.mean(), rtol=1e-6)
    assert int(new_state["step"]) == 1
    # A batch that does not split into k micro-batches is refused.
    with pytest.raises(ValueError, match="micro-batches"):
        step(new_state, jax.tree.map(lambda x: x[:5], batch))


def test_model_train_step_moves_only_biases_by_the_rule(tiny_params):
    """One jitted step of the real model: every router bias moves exactly by gamma * sign(mean - load)
    (so AdamW and its weight decay never touched them, non-zero as they are); the optimizer moved every
    other weight."""
    config = _tiny_config()
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, x.dtype)
        if "e_score_correction_bias" in jax.tree_util.keystr(p) else jnp.array(x), tiny_params)
    opt_cfg = default_optimizer_config()
    opt_cfg.update(learning_rate=0.01, warmup_steps=0, schedule="constant", weight_decay=0.5)
    tx = optim.make_optimizer(opt_cfg, params)
    gamma = 0.01
    recipe = pretrain.recipe(_smoke_config())  # the same model; mtp_loss_weight 0.3, balance_loss_alpha 1e-4
    assert config_lib.model_config_from(_smoke_config()).to_dict() == config.to_dict()
    step = step_lib.make_train_step(recipe.loss, tx, router_bias_update_rate=gamma)
    batch = _packed_batch(seed=3)
    _, (_, _, aux) = _forward_and_loss(params, batch, 0.3, 1e-4)
    old = jax.tree.map(np.array, params)  # copies: the step donates the state
    new_state, m = step(step_lib.init_train_state(params, tx), batch)
    new = jax.tree.map(np.asarray, new_state["params"])
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0

    bias_paths = set(router_bias_paths(old).values())
    assert len(bias_paths) == 2
    moved = 0
    for key, path in router_bias_paths(old).items():
        load = np.asarray(aux[key]["expert_load"])
        want = gamma * np.sign(load.mean(-1, keepdims=True) - load)
        got_old, got_new = old, new
        for name in path:
            got_old, got_new = got_old[name], got_new[name]
        np.testing.assert_allclose(got_new - got_old, want, atol=1e-6)
        moved += int(np.count_nonzero(want))
    assert moved > 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(old)[0]:
        names = tuple(k.key for k in path)
        if names in bias_paths:
            continue
        got = new
        for name in names:
            got = got[name]
        assert not np.array_equal(got, leaf), f"{'/'.join(names)} did not change"


# ------------------------------------------------------------------ the loop


def _smoke_config(**overrides):
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from configs import smoke  # pylint: disable=import-outside-toplevel
    finally:
        sys.path.remove(str(REPO_ROOT))
    values = smoke.get_config().to_dict()
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def _bigram_loss(params, frozen, batch, rng):
    """A bigram model on the real batch layout: the loop trains any params with any loss."""
    del frozen, rng
    logits = params["table"]["embedding"][batch["tokens"]]  # [B, T, V]
    loss = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss, dict(loss=loss), {}


class _Hooked:
    """Batches passed through ``hook(step, batch)`` (the step they are for, 1-based); the wrapped
    batches' data position is kept."""

    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def next(self, state):
        batch = self.inner.next(state)
        return None if batch is None else self.hook(int(state["step"]) + 1, batch)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _smoke_config(num_steps=10, checkpoint_every=3, log_every=1, async_checkpointing=False,
                           tensorboard=False)

    def poison(step, batch):
        if step == 8:
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        return batch

    lines = []
    recipe = Recipe(loss=_bigram_loss, batches=lambda *args: _Hooked(pretrain.data_batches(*args), poison),
                    init_params=lambda model_config, rng: {"table": {"embedding": jnp.zeros((259, 259))}})
    run = lambda: loop.train(config, str(tmp_path), recipe, print_fn=lines.append)  # noqa: E731
    with pytest.raises(loop.NonFiniteError) as err:
        run()
    message = str(err.value)
    assert "step 8" in message and "loss" in message and "grad_norm" in message
    assert "last good checkpoint is step 6" in message
    assert ckpt.complete_steps(tmp_path / "checkpoints") == [3, 6]
    assert not (tmp_path / "checkpoints" / "8").exists()
    entries = metrics.read_metrics(str(tmp_path))
    assert [e["step"] for e in entries] == list(range(1, 8))
    assert entries[-1]["loss"] < entries[0]["loss"]  # the bigram table did learn
    assert len(lines) == 7
    # Restarting resumes from the good step 6 and stops again at the bad batch of step 8.
    lines.clear()
    with pytest.raises(loop.NonFiniteError, match="step 8"):
        run()
    assert lines[0].startswith("Resuming from step 6")
    assert [e["step"] for e in metrics.read_metrics(str(tmp_path))] == list(range(1, 8))


def test_init_from_a_training_checkpoint(tmp_path, tiny_params):
    params = jax.tree.map(lambda x: x + 0.5, tiny_params)  # unlike any random init
    with ckpt.Checkpointer(str(tmp_path / "run"), async_save=False) as saver:
        saver.save(7, {"params": params, "step": jnp.asarray(7, jnp.int32)}, config=_smoke_config().to_dict())
    config = _smoke_config(init_from=str(tmp_path / "run"))
    got = init_lib.initial_params(config, config_lib.model_config_from(config), jax.random.key(3))
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = _smoke_config(init_from=str(tmp_path / "run"), model_overrides=dict(hidden_size=40))
    with pytest.raises(ValueError, match="shape"):
        init_lib.initial_params(wider, config_lib.model_config_from(wider), jax.random.key(3))


def test_init_from_an_hf_checkpoint(tmp_path):
    from hf_reference import HFReference  # pylint: disable=import-outside-toplevel

    model = make_config("tiny_v3", **TINY)
    reference = HFReference(model, str(tmp_path), seed=2)
    config = _smoke_config(model="hf", init_from=str(tmp_path))
    model_config = config_lib.model_config_from(config)
    assert model_config.hidden_size == 32 and model_config.num_mtp_layers == 1
    got = init_lib.initial_params(config, model_config, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(got["embed"]["embedding"]),
                                  reference.model.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(
        np.asarray(got["moe_layers"]["mlp"]["router"]["e_score_correction_bias"][0]),
        reference.model.model.layers[1].mlp.gate.e_score_correction_bias.detach().numpy())


def _run_cli(workdir, *extra, env):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config", str(REPO_ROOT / "configs" / "smoke.py"),
         "--workdir", str(workdir), "--config.log_every=1", "--config.checkpoint_every=10",
         "--config.keep_checkpoints=0", *extra],
        cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
    entries = metrics.read_metrics(str(workdir))
    steps = [e["step"] for e in entries]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {e["step"]: e["loss"] for e in entries}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """An uninterrupted 60-step CLI run; then a 40-step run killed with SIGKILL once its first
    checkpoint (step 10) is complete, restarted with the same command, then continued to step 60.

    The runs share a persistent compilation cache: the later processes load the executables the first
    one compiled (the very same programs), which keeps the restarts cheap.
    """
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    full = _run_cli(root / "full", "--config.num_steps=60", env=env)
    full_output = full.communicate()[0]
    assert full.returncode == 0, full_output

    # The interrupted run: killed once checkpoint 10 is complete, restarted with the same command
    # (to step 40), then continued with a larger num_steps (to 60).
    command = ("--config.num_steps=40", "--config.tensorboard=False")
    killed = _run_cli(root / "killed", *command, env=env)
    alive_at_kill, killed_output = kill_once_saved(killed, root / "killed" / "checkpoints" / "10")
    logged_before_restart = _losses(root / "killed")
    saved_at_kill = ckpt.complete_steps(root / "killed" / "checkpoints")
    outputs = []
    for extra in (command, ("--config.num_steps=60", "--config.tensorboard=False")):
        proc = _run_cli(root / "killed", *extra, env=env)
        outputs.append(proc.communicate()[0])
        assert proc.returncode == 0, outputs[-1]
    return dict(root=root, full_output=full_output, killed_output=killed_output, alive_at_kill=alive_at_kill,
                logged_before_restart=logged_before_restart, saved_at_kill=saved_at_kill, outputs=outputs)


def test_cli_run_writes_metrics_checkpoints_and_events(cli_runs):
    workdir = cli_runs["root"] / "full"
    entries = metrics.read_metrics(str(workdir))
    assert [e["step"] for e in entries] == list(range(1, 61))
    required = {"step", "loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s",
                "expert_load_max_over_mean", "expert_load_min_over_mean"}
    for entry in entries:
        assert required <= set(entry), required - set(entry)
        assert all(np.isfinite(entry[k]) for k in required)
        assert entry["expert_load_max_over_mean"] >= 1.0 >= entry["expert_load_min_over_mean"]
    assert entries[-1]["loss"] < entries[0]["loss"]
    assert ckpt.complete_steps(workdir / "checkpoints") == list(range(10, 61, 10))
    saved = ckpt.Checkpointer(str(workdir)).restore_config(60)
    assert saved["num_steps"] == 60 and saved["model"]["hidden_size"] == 32
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
    lines = [line for line in cli_runs["full_output"].splitlines() if line.startswith("step ")]
    assert len(lines) == 60
    assert "step 60/60" in lines[-1] and "lm " in lines[-1] and "tok/s" in lines[-1] and "ETA" in lines[-1]


def test_sigkill_resume_reproduces_the_uninterrupted_losses(cli_runs):
    assert cli_runs["alive_at_kill"], "the run finished before it could be killed"
    resumed_from = max(cli_runs["saved_at_kill"])
    assert resumed_from < 40
    # The killed run had logged steps past its last checkpoint: the restart must drop them.
    assert max(cli_runs["logged_before_restart"]) > resumed_from
    assert f"Resuming from step {resumed_from}" in cli_runs["outputs"][0]
    full = _losses(cli_runs["root"] / "full")
    resumed = _losses(cli_runs["root"] / "killed")  # asserts no duplicate steps
    assert sorted(resumed) == list(range(1, 61))
    for step in range(1, 61):
        assert abs(resumed[step] - full[step]) <= 1e-5, (step, resumed[step], full[step])
    # The continued run (num_steps 40 -> 60) resumed from the step-40 checkpoint.
    assert "Resuming from step 40" in cli_runs["outputs"][1]


def test_train_config_errors_name_the_key():
    config = _smoke_config()
    config.optimizer.accumulation_steps = 3
    with pytest.raises(ValueError, match="batch_size"):
        config_lib.validate_train_config(config)
    config = _smoke_config(log_every=0)
    with pytest.raises(ValueError, match="log_every"):
        config_lib.validate_train_config(config)
    config = _smoke_config(model="no_such_model")
    with pytest.raises(ValueError, match="no_such_model"):
        config_lib.model_config_from(config)
    config = _smoke_config(model="tiny_v3")
    config.model_overrides = ml_collections.ConfigDict(dict(num_layers=2))
    assert config_lib.model_config_from(config).num_layers == 2
