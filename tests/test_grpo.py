"""The GRPO recipe: keep routing and keep sampling mask on rollouts, the loop end to end, SIGKILL and
resume, 8 devices against one, prompt rows and rewards; the quickstart's accuracy gain (slow)."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import grpo_mixed, grpo_quickstart
from dsjax import checkpoint as ckpt
from dsjax import parallel, recipes
from dsjax.data.prompts import read_prompt_rows
from dsjax.inference.rollout import LocalEngine, SamplingParams, policy_log_probs, routing_mismatch, score
from dsjax.inference.rollout import input_mask
from dsjax.model import init_params, make_config
from dsjax.recipes.grpo import GRPOSettings, RewardSpec, Rewards, default_grpo_config, grpo_loss_fn
from dsjax.train.metrics import read_metrics
from sigkill import kill_once_saved

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The smallest model with MLA, a dense and an MoE layer (12 routed experts, 3 per token, 4 groups).
TINY = dict(hidden_size=32, num_layers=2, num_mtp_layers=0, dense_intermediate_size=48, moe_intermediate_size=16)
# Command-line overrides that shrink configs/grpo_quickstart.py to seconds per run.
SMALL_RUN = dict(**{f"model.{k}": v for k, v in TINY.items()}, **{
    "model.moe_impl": "ragged", "prompts.task_options.train_size": 64, "prompts.task_options.eval_size": 8,
    "grpo.num_samples": 4, "grpo.prompts_per_rollout": 4, "grpo.num_iterations": 2, "grpo.sft_steps": 0,
    "grpo.kl_coef": 0.05, "grpo.off_policy_delta": 0.5, "grpo.top_p": 0.9, "grpo.eval_every": 2,
    "batch_size": 8, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 0, "tensorboard": False,
    "optimizer.learning_rate": 3e-3, "grpo.rewards.exact_sum.function": "test_grpo:digit_share"})
# What every logged GRPO step carries.
STEP_METRICS = ("loss", "reward_mean", "kl", "clip_fraction", "off_policy_masked_fraction", "routing_mismatch_rate",
                "response_length_mean", "entropy", "rollout_seconds", "update_seconds", "grad_norm")


def digit_share(prompts, completions, **columns):
    """A reward for a random model ("module:function" in the config): the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def _small_config(**overrides):
    """configs/grpo_quickstart.py with SMALL_RUN and ``overrides`` ("a.b": value) applied."""
    config = grpo_quickstart.get_config()
    for key, value in {**SMALL_RUN, **overrides}.items():
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


# ------------------------------------------------------------------ keep routing, keep sampling mask


@pytest.fixture(scope="module")
def sampled():
    """Rollouts of a random tiny model with top-p 0.7 (so the kept set is a real subset)."""
    config = make_config("tiny_v3", **TINY)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 9, 7)]
    sampling = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.7, stop_tokens=tuple(range(3, 256, 9)), pad_token=258)
    rollouts = LocalEngine(config).sample(params, prompts, num_samples=2, sampling=sampling, seed=3)
    return config, params, rollouts


def _ratios(config, params, rollouts, *, replay, sampling_mask):
    num_new = rollouts.mask.shape[1]
    logits, aux = score(params, config, rollouts.tokens, rollouts.segment_ids, num_new,
                        expert_indices=rollouts.expert_indices if replay else None)
    cutoff = rollouts.truncation_cutoff if sampling_mask else None
    logp, _ = policy_log_probs(logits, rollouts.tokens[:, -num_new:], cutoff, 0.9)
    ratios = np.exp(np.asarray(logp) - rollouts.old_logprobs)[rollouts.mask > 0]
    valid = input_mask(rollouts.segment_ids, rollouts.mask)
    mismatch = float(routing_mismatch(aux["moe_layers"]["expert_indices"], rollouts.expert_indices["moe_layers"], valid))
    return ratios, mismatch


def _perturbed(params, scale=0.1, seed=1):
    """Every leaf moved by noise of ``scale`` times its own spread, as an update would move it."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * np.std(np.asarray(x)) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, moved)


def test_first_iteration_ratio_is_one_only_with_the_sampling_mask(sampled):
    config, params, rollouts = sampled
    assert rollouts.mask.sum() > 20 and (rollouts.lengths < 8).any()  # some rows stopped early
    kept = np.asarray(rollouts.truncation_cutoff)[rollouts.mask > 0]
    assert np.isfinite(kept).all()  # top-p truncated every step
    ratios, mismatch = _ratios(config, params, rollouts, replay=True, sampling_mask=True)
    np.testing.assert_allclose(ratios, 1.0, rtol=0, atol=2e-5)
    assert mismatch == 0.0
    # The same tokens scored over the whole vocabulary: pi_theta is no longer the sampler's pi_old.
    unmasked, _ = _ratios(config, params, rollouts, replay=True, sampling_mask=False)
    assert np.abs(unmasked - 1).max() > 0.05 and (unmasked < 1).all()


def test_replay_keeps_every_sampled_expert_after_an_update(sampled):
    config, params, rollouts = sampled
    moved = _perturbed(params)
    _, replayed = _ratios(config, moved, rollouts, replay=True, sampling_mask=True)
    _, recomputed = _ratios(config, moved, rollouts, replay=False, sampling_mask=True)
    assert replayed == 0.0
    assert recomputed > 0.01


def test_the_sampled_token_stays_in_the_kept_set_after_a_large_update(sampled):
    config, params, rollouts = sampled
    far = _perturbed(params, scale=1.0, seed=2)
    num_new = rollouts.mask.shape[1]
    logits, _ = score(far, config, rollouts.tokens, rollouts.segment_ids, num_new,
                      expert_indices=rollouts.expert_indices)
    picked = np.take_along_axis(np.asarray(logits), rollouts.tokens[:, -num_new:, None], -1)[..., 0]
    below = (picked < rollouts.truncation_cutoff)[rollouts.mask > 0]
    assert below.any()  # the cutoff alone would now drop some sampled tokens
    ratios, _ = _ratios(config, far, rollouts, replay=True, sampling_mask=True)
    assert np.isfinite(ratios).all() and (ratios > 0).all()


def test_the_recipe_loss_reports_ratio_and_routing_mismatch(sampled):
    config, params, rollouts = sampled
    grpo = dict(default_grpo_config().to_dict(), max_new_tokens=8, temperature=0.9, top_p=0.7, kl_coef=0.1,
                rewards={"any": dict(function="format_reward")})
    settings = GRPOSettings.from_config(ml_collections.ConfigDict(dict(grpo=grpo)))
    loss_fn = jax.jit(grpo_loss_fn(settings, ml_collections.FrozenConfigDict(config), use_kl=True))
    rows = len(rollouts.tokens)
    batch = dict(rollouts._asdict(), advantages=np.linspace(-1, 1, rows, dtype=np.float32),
                 kl_coef=np.full(rows, 0.1, np.float32))
    del batch["lengths"]
    _, same, _ = loss_fn(params, {"reference": params}, batch, jax.random.key(0))
    assert abs(float(same["ratio_min"]) - 1) < 2e-5 and abs(float(same["ratio_max"]) - 1) < 2e-5
    assert float(same["routing_mismatch_rate"]) == 0.0 and abs(float(same["kl"])) < 1e-6
    _, moved, _ = loss_fn(_perturbed(params), {"reference": params}, batch, jax.random.key(0))
    assert float(moved["routing_mismatch_rate"]) > 0.01 and float(moved["kl"]) > 0
    assert np.isfinite(float(moved["entropy"])) and float(moved["entropy"]) > 0


# ------------------------------------------------------------------ the loop end to end


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """configs/grpo_mixed.py shrunk: a 3-step supervised phase, then 6 GRPO steps (math and code)."""
    config = grpo_mixed.get_config()
    config.model.update(dict(TINY, moe_impl="ragged"))
    config.prompts.task_options.update(dict(train_size=32, eval_size=4))
    config.grpo.update(dict(num_samples=2, prompts_per_rollout=4, max_new_tokens=12, sft_steps=3, sft_batch_size=4,
                            eval_every=3))
    config.update(dict(batch_size=4, num_steps=6, log_every=1, checkpoint_every=6, tensorboard=False))
    workdir = tmp_path_factory.mktemp("mixed")
    lines = []
    result = recipes.run(config, str(workdir), print_fn=lines.append)
    return workdir, result, lines


def test_grpo_steps_through_the_loop_log_every_metric(mixed_run):
    workdir, result, lines = mixed_run
    assert result.step == 6 and set(result.state["frozen"]) == {"reference"}  # code has a KL weight
    assert max(ckpt.complete_steps(workdir / "sft" / "checkpoints")) == 3  # the supervised phase ran first
    entries = read_metrics(str(workdir))
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    for entry in entries:
        for key in STEP_METRICS:
            assert np.isfinite(entry[key]), (entry["step"], key)
        assert 0 <= entry["routing_mismatch_rate"] <= 1 and entry["rollout_seconds"] > 0
        assert {"reward/math", "reward/code"} & set(entry)
    evals = {e["step"]: e["eval_accuracy"] for e in entries if "eval_accuracy" in e}
    assert sorted(evals) == [1, 3, 6]  # the start, before step 3, before the last step
    assert any(line.startswith("step") and "reward" in line for line in lines)
    assert lines[-1].startswith("eval_accuracy")


# ------------------------------------------------------------------ SIGKILL and resume


def _run_cli(workdir, env, **overrides):
    """experiments.train on configs/grpo_quickstart.py with SMALL_RUN and ``overrides`` ("a.b": value)."""
    flags = [f"--config.{key}={value}" for key, value in {**SMALL_RUN, **overrides}.items()]
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config", str(REPO_ROOT / "configs" / "grpo_quickstart.py"),
         "--workdir", str(workdir), *flags],
        cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _per_step(workdir, key):
    entries = read_metrics(str(workdir))
    steps = [e["step"] for e in entries]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {e["step"]: e[key] for e in entries}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """An uninterrupted 12-step run, and one killed with SIGKILL once its step-3 checkpoint is
    complete (inside a rollout's 4 steps), then rerun with the same command."""
    root = tmp_path_factory.mktemp("grpo_cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))  # for digit_share
    env.pop("XLA_FLAGS", None)
    overrides = {"num_steps": 12, "grpo.eval_every": 0}  # evals: see mixed_run
    full = _run_cli(root / "full", env, **overrides)
    full_output = full.communicate()[0]
    assert full.returncode == 0, full_output
    killed = _run_cli(root / "killed", env, **overrides)
    alive_at_kill, _ = kill_once_saved(killed, root / "killed" / "checkpoints" / "3")
    saved_at_kill = ckpt.complete_steps(root / "killed" / "checkpoints")
    rerun = _run_cli(root / "killed", env, **overrides)
    rerun_output = rerun.communicate()[0]
    assert rerun.returncode == 0, rerun_output
    return dict(root=root, alive_at_kill=alive_at_kill, saved_at_kill=saved_at_kill, rerun_output=rerun_output)


def test_sigkill_resume_reproduces_rewards_and_losses(cli_runs):
    assert cli_runs["alive_at_kill"], "the run finished before it could be killed"
    resumed_from = max(cli_runs["saved_at_kill"])
    assert resumed_from % 4 != 0  # inside a rollout: its batch came back from WORKDIR/rollouts
    assert f"Resuming from step {resumed_from}" in cli_runs["rerun_output"]
    assert (cli_runs["root"] / "killed" / "rollouts" / f"{resumed_from - resumed_from % 4}.npz").exists()
    for key in ("loss", "reward_mean", "kl", "entropy", "routing_mismatch_rate"):
        full, resumed = _per_step(cli_runs["root"] / "full", key), _per_step(cli_runs["root"] / "killed", key)
        assert sorted(resumed) == sorted(full) == list(range(1, 13))
        for step in full:
            assert abs(resumed[step] - full[step]) <= 1e-5, (key, step, resumed[step], full[step])
    rewards = _per_step(cli_runs["root"] / "full", "reward_mean")
    assert len({rewards[s] for s in (1, 5, 9)}) > 1  # three rollouts, not one replayed


# ------------------------------------------------------------------ 8 devices


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    """The same 4 GRPO steps (two rollouts) on one device and on an fsdp 2 x expert 4 mesh of the 8 CPU
    devices."""
    runs = {}
    for name, mesh in (("single", parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])),
                       ("fsdp_expert", parallel.make_mesh({"fsdp": 2, "expert": 4}))):
        config = _small_config(**{"num_steps": 4, "checkpoint_every": 4, "async_checkpointing": False,
                                  "grpo.num_iterations": 1, "grpo.eval_every": 0})  # two rollouts, no evals
        workdir = tmp_path_factory.mktemp(name)
        runs[name] = workdir, recipes.run(config, str(workdir), mesh=mesh, print_fn=None)
    return runs


def test_fsdp_expert_mesh_gives_the_one_device_rewards_and_losses(mesh_runs):
    single, sharded = mesh_runs["single"][0], mesh_runs["fsdp_expert"][0]
    assert max(_per_step(single, "reward_mean").values()) > 0
    for key in ("reward_mean", "loss", "kl", "entropy"):
        want, got = _per_step(single, key), _per_step(sharded, key)
        assert sorted(got) == [1, 2, 3, 4]
        np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5, atol=1e-6, err_msg=key)
    kernel = mesh_runs["fsdp_expert"][1].state["params"]["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec[1] == "expert"
    reference = mesh_runs["fsdp_expert"][1].state["frozen"]["reference"]["moe_layers"]["mlp"]["experts"]
    assert reference["gate_proj"]["kernel"].sharding.spec == kernel.sharding.spec


# ------------------------------------------------------------------ prompt rows, rewards, config errors


def test_prompt_rows_are_checked_with_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = dict(prompt="1+1=", domain="math", answer="2")
    lines = [json.dumps(good), "", json.dumps(dict(messages=[{"role": "user", "content": "hi"}], domain="chat",
                                                   thinking=True))]
    path.write_text("\n".join(lines) + "\n")
    rows = read_prompt_rows(str(path))
    assert [r["domain"] for r in rows] == ["math", "chat"] and rows[0]["thinking"] is False
    for bad, why in ((dict(prompt="x"), "needs a .domain."), ("[1]", "expected a JSON object"),
                     (dict(prompt="x", messages=[], domain="d"), "needs exactly one of"),
                     (dict(prompt="x", domain="d", thinking="yes"), "'thinking' must be"), ("{oops", "not valid JSON")):
        path.write_text(json.dumps(good) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
        with pytest.raises(ValueError, match=rf"^{path}:2: ({why})"):
            read_prompt_rows(str(path))


def test_rewards_are_weighted_and_applied_per_domain():
    seen = []

    def length(prompts, completions, completion_lengths, **columns):
        seen.append(sorted(columns))
        return [float(n) for n in completion_lengths]

    def one(prompts, completions, **columns):
        return [1.0] * len(completions)

    rewards = Rewards([RewardSpec("len", length, 0.5, ("code",)), RewardSpec("one", one, 2.0, ())])
    rows = [dict(prompt="a", domain="math", answer="1"), dict(prompt="b", domain="code", tests="t")]
    np.testing.assert_allclose(rewards(rows, ["x", "y"], [3, 4]), [2.0, 4.0])
    assert seen == [["domain", "tests"]]  # called on the code row only, with its columns


def test_grpo_config_errors_name_the_key(tmp_path):
    for overrides, match in (({"grpo.temperature": 0.0}, "grpo.temperature"), ({"grpo.kl_coef": -1.0}, "kl_coef"),
                             ({"batch_size": 24}, "batch_size"), ({"grpo.eval_every": 3, "log_every": 2}, "eval_every")):
        config = _small_config(**overrides)
        with pytest.raises(ValueError, match=match):
            recipes.grpo.recipe(config).batches(config, 0, 1)
    config = _small_config()
    config.grpo.rewards.exact_sum = dict(function="no_such_reward")
    with pytest.raises(ValueError, match="rewards.exact_sum: unknown reward"):
        recipes.grpo.recipe(config)


# ------------------------------------------------------------------ the quickstart (slow)


@pytest.mark.slow
def test_quickstart_raises_eval_accuracy_by_20_points(tmp_path):
    workdir = tmp_path / "quickstart"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                           str(REPO_ROOT / "configs" / "grpo_quickstart.py"), "--workdir", str(workdir)],
                          cwd=str(REPO_ROOT), env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.time() - start < 600
    evals = [e["eval_accuracy"] for e in read_metrics(str(workdir)) if "eval_accuracy" in e]
    assert evals[-1] - evals[0] >= 0.2, evals
