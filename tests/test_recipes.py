"""The recipe interface of the one training loop: frozen parameter trees (explicit, sharded step
arguments that survive resume and never change), on-policy batches built from the current params,
the `config.recipe` dispatch, and the README's "Writing a recipe" example, run as written."""

import dataclasses
import pathlib
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsjax import checkpoint as ckpt
from dsjax import parallel
from dsjax import recipes
from dsjax.model import forward, make_config, param_shardings
from dsjax.recipes import Recipe, losses
from dsjax.train import config as config_lib
from dsjax.train import init as init_lib
from dsjax.train import loop, metrics, optim
from dsjax.train import step as step_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH = {"fsdp": 4, "expert": 2}  # the 8 CPU devices of conftest: every param sharding differs from replicated
SEQ_LEN = 12


def _config(**overrides):
    """4 steps of a tiny MoE model (no MTP) on 8 rows of 12 tokens."""
    config = config_lib.default_train_config()
    config.model = make_config("tiny_v3", hidden_size=32, num_layers=2, num_mtp_layers=0, dense_intermediate_size=48,
                               moe_intermediate_size=16)
    config.update(dict(num_steps=4, batch_size=8, seq_len=SEQ_LEN, log_every=1, checkpoint_every=1, keep_checkpoints=0,
                       tensorboard=False, async_checkpointing=False))
    config.optimizer.update(dict(learning_rate=1e-2, warmup_steps=0, schedule="constant"))
    config.update(overrides)
    return config


# ------------------------------------------------------------------ a distillation-like recipe


def _fingerprint(params) -> float:
    """A number that changes with every parameter, computed on the host (no collectives in flight)."""
    return float(sum(np.abs(np.asarray(leaf, np.float64)).sum() for leaf in jax.tree.leaves(jax.device_get(params))))


class _Rollouts:
    """On-policy batches: prompts picked by the step, completed greedily by the current params.

    Row r is a random first half; the second half holds the model's argmax predictions for the
    positions after the prompt (one forward pass of ``state["params"]``). ``seen`` records, per
    batch, the step it is for and a fingerprint of the params it was made with."""

    def __init__(self, model_config, rows: int, index: int):
        self.rows, self.index, self.seen = rows, index, []
        self.greedy = jax.jit(lambda params, tokens: jnp.argmax(forward(params, tokens, model_config).logits, -1))
        self.vocab = model_config.vocab_size

    def next(self, state):
        step = int(state["step"])
        prompts = np.random.default_rng([step, self.index]).integers(3, self.vocab, (self.rows, SEQ_LEN))
        predicted = np.asarray(self.greedy(state["params"], prompts))
        half = SEQ_LEN // 2
        tokens = prompts.copy()
        tokens[:, half:] = predicted[:, half - 1:-1]
        self.seen.append((step + 1, _fingerprint(state["params"])))
        return dict(tokens=tokens)


def _distillation(config, rollouts_made: list):
    """Next-token CE on the rollouts plus KL(teacher || student), the teacher a frozen copy of
    the initial params."""
    model = ml_collections.FrozenConfigDict(config_lib.model_config_from(config))

    def loss(params, frozen, batch, rng):
        del rng
        out = forward(params, batch["tokens"], model)
        teacher = jax.nn.log_softmax(forward(frozen["teacher"], batch["tokens"], model).logits.astype(jnp.float32))
        student = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        kl = jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), -1))
        targets = batch["tokens"][:, 1:]
        ce = losses.cross_entropy(out.logits[:, :-1], targets, jnp.ones(targets.shape))
        return ce + kl, dict(ce=ce, kl=kl), out.aux

    def batches(config, index, count):
        rollouts_made.append(_Rollouts(model, config.batch_size // count, index))
        return rollouts_made[-1]

    return Recipe(loss=loss, batches=batches, frozen=lambda params: {"teacher": params})


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """An uninterrupted 4-step run; then one resumed from its step-2 checkpoint (on the same mesh)."""
    config = _config()
    config.mesh.update(MESH)
    full_dir = tmp_path_factory.mktemp("full")
    rollouts = []
    full = loop.train(config, str(full_dir), _distillation(config, rollouts), print_fn=None)
    resumed_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(full_dir, resumed_dir)
    for step in (3, 4):
        shutil.rmtree(resumed_dir / "checkpoints" / str(step))
    lines = []
    resumed = loop.train(config, str(resumed_dir), _distillation(config, rollouts), print_fn=lines.append)
    return dict(config=config, full=full, full_dir=full_dir, resumed=resumed, resumed_dir=resumed_dir,
                rollouts=rollouts, lines=lines)


def _initial_params(config):
    """The run's initial params, as the loop made them (seed 0, one device)."""
    return init_lib.initial_params(config, config_lib.model_config_from(config), step_lib.init_key(config.seed))


def test_frozen_tree_is_the_initial_params_unchanged_and_sharded_like_them(distilled):
    full, config = distilled["full"], distilled["config"]
    teacher, params = full.state["frozen"]["teacher"], full.state["params"]
    assert set(full.state) == {"params", "opt_state", "step", "frozen"} and int(full.state["step"]) == 4
    initial = _initial_params(config)
    for got, want in zip(jax.tree.leaves(teacher), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # never updated, bit for bit
    assert _fingerprint(params) != _fingerprint(teacher)  # while the params did move
    # Sharded on the 8-device mesh by the model's rules, exactly like the trained params.
    mesh = parallel.make_mesh(MESH)
    want_shardings = param_shardings(full.model_config, mesh)
    for leaf, trained, sharding in zip(jax.tree.leaves(teacher), jax.tree.leaves(params),
                                       jax.tree.leaves(want_shardings)):
        assert leaf.sharding.spec == trained.sharding.spec == sharding.spec
        assert dict(leaf.sharding.mesh.shape) == dict(mesh.shape)
    experts = teacher["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert not experts.sharding.is_fully_replicated and len({s.device for s in experts.addressable_shards}) == 8
    # The checkpoint holds the frozen tree next to the params; the params item alone stays as it was.
    saved = ckpt.restore_params(distilled["full_dir"])
    assert jax.tree.structure(saved) == jax.tree.structure(params)


def test_on_policy_batches_see_the_updated_params(distilled):
    """The batch of step s is made from the params after step s - 1 (the checkpoint of s - 1)."""
    full_rollouts = distilled["rollouts"][0]
    assert [step for step, _ in full_rollouts.seen] == [1, 2, 3, 4]
    assert full_rollouts.seen[0][1] == _fingerprint(_initial_params(distilled["config"]))
    for step, fingerprint in full_rollouts.seen[1:]:
        assert fingerprint == _fingerprint(ckpt.restore_params(distilled["full_dir"] / "checkpoints" / str(step - 1)))
    assert len({fingerprint for _, fingerprint in full_rollouts.seen}) == 4  # the params changed every step


def test_frozen_tree_survives_resume_and_the_run_continues_exactly(distilled):
    full, resumed = distilled["full"], distilled["resumed"]
    assert any(line.startswith("Resuming from step 2") for line in distilled["lines"])
    assert [step for step, _ in distilled["rollouts"][1].seen] == [3, 4]
    for got, want in zip(jax.tree.leaves(resumed.state["frozen"]), jax.tree.leaves(full.state["frozen"])):
        assert got.sharding.spec == want.sharding.spec
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(resumed.state["params"]), jax.tree.leaves(full.state["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    want = {e["step"]: e for e in metrics.read_metrics(str(distilled["full_dir"]))}
    got = {e["step"]: e for e in metrics.read_metrics(str(distilled["resumed_dir"]))}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "ce", "kl"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6)
    assert want[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert want[4]["kl"] > 1e-4  # the student left its teacher


def test_frozen_tree_is_a_step_argument_not_a_constant():
    """Other frozen values give another loss from the same compiled step; its jaxpr takes the
    frozen leaves as inputs and bakes none in."""
    config = _config()
    model_config = config_lib.model_config_from(config)
    recipe = _distillation(config, [])
    params = _initial_params(config)
    tx = optim.make_optimizer(config.optimizer, params)
    batch = dict(tokens=np.random.default_rng(0).integers(3, 200, (8, SEQ_LEN)))
    mesh = parallel.make_mesh(MESH)
    shardings = param_shardings(model_config, mesh)

    def state_with(teacher):
        state = step_lib.init_train_state(params, tx, {"teacher": teacher})
        out = parallel.state_shardings(jax.eval_shape(lambda: state), shardings, mesh)
        out["frozen"] = {"teacher": shardings}
        return jax.device_put(state, out), out

    same, state_shardings = state_with(params)
    step = step_lib.make_train_step(recipe.loss, tx, mesh=mesh, state_shardings=state_shardings)
    _, from_same = step(same, batch)
    _, from_other = step(state_with(jax.tree.map(lambda x: x * 1.5, params))[0], batch)
    assert float(from_same["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(from_other["kl"]) > 1e-3
    assert len(step.jitted) == 1 and next(iter(step.jitted.values()))._cache_size() == 1  # compiled once

    plain = step_lib.make_train_step(recipe.loss, tx, jit=False)
    state = step_lib.init_train_state(params, tx, {"teacher": params})
    closed = jax.make_jaxpr(plain)(state, batch)
    assert len(closed.jaxpr.invars) == len(jax.tree.leaves(state)) + len(jax.tree.leaves(batch))
    for const in closed.consts:  # (the step's PRNG key, the model's constant tables: no parameter)
        for leaf in jax.tree.leaves(params):
            if np.shape(const) == leaf.shape and leaf.size > 1:
                assert not np.array_equal(np.asarray(const), np.asarray(leaf))


# ------------------------------------------------------------------ dispatch


def test_recipe_dispatch_and_its_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"config.recipe='nope': must be one of {sorted(recipes.RECIPES)}")):
        recipes.run(_config(recipe="nope"), str(tmp_path))
    with pytest.raises(ValueError, match=r"config.recipe=''"):
        config_lib.validate_train_config(_config(recipe=""))
    assert config_lib.default_train_config().recipe == "pretrain"
    assert recipes.RECIPES["pretrain"] is recipes.pretrain.run and recipes.RECIPES["dsa"] is recipes.dsa.run
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------ the README's example


def _readme_recipe() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("\n## Writing a recipe\n"):]
    section = section[:section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) < 40
    return code


def test_readme_recipe_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES", dict(recipes.RECIPES))  # the example registers "counting"
    namespace = {}
    exec(compile(_readme_recipe(), "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from configs import smoke  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO_ROOT))
    config = smoke.get_config()
    config.update(dict(recipe="counting", num_steps=6, log_every=1, checkpoint_every=3, tensorboard=False,
                       async_checkpointing=False))
    one_device = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    result = recipes.run(config, str(tmp_path), mesh=one_device, print_fn=None)
    assert result.step == 6
    entries = metrics.read_metrics(str(tmp_path))
    assert [e["step"] for e in entries] == list(range(1, 7))
    assert entries[-1]["ce"] < entries[0]["ce"]
    assert entries[0]["drift"] == 0.0 < entries[-1]["drift"]
    initial = _initial_params(config)
    for got, want in zip(jax.tree.leaves(result.state["frozen"]["initial"]), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Resuming needs no data position: the batches follow from the step.
    config.num_steps = 8
    lines = []
    assert recipes.run(config, str(tmp_path), mesh=one_device, print_fn=lines.append).step == 8
    assert lines[0].startswith("Resuming from step 6") and "no position to restore" in lines[0]


def test_recipe_is_a_frozen_dataclass():
    recipe = Recipe(loss=lambda *args: None, batches=lambda *args: None)
    defaults = (recipe.frozen, recipe.trainable, recipe.update_router_biases, recipe.init_params)
    assert defaults == (None, None, True, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.trainable = False
