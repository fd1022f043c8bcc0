"""GRPO with DeepSeek-V3.2's objective, Keep Routing and Keep Sampling Mask: the "grpo" recipe.

Every ``steps_per_rollout = num_iterations * (P * G / batch_size)`` optimizer steps, ``next(state)``
samples a rollout batch from the *current* params: G completions of each of P prompts
(``config.prompts``; :class:`dsjax.inference.rollout.LocalEngine`), recording per token pi_old,
the top-k/top-p cutoff and every MoE layer's experts. Each completion gets the weighted sum of the
rewards that apply to its row's domain; advantages are group-relative
(:func:`dsjax.rl.group_advantages`). The rollout is then trained on ``num_iterations`` times, in
shuffled mini-batches of ``config.batch_size`` rows. The loss (:func:`grpo_loss_fn`) replays the
sampler's experts (combine weights from the live router), takes pi_theta over the sampler's kept
set at its temperature, pi_ref from the frozen ``"reference"`` tree (the initial params; absent
when every ``kl_coef`` is 0) under the same experts and mask, and calls :func:`dsjax.rl.grpo_loss`
with a per-row KL weight.

Host-side metrics ride on the batch as ``metrics/<name>`` entries (:mod:`dsjax.train.recipe`):
the rollout's ``reward_mean``, ``reward/<domain>``, ``response_length_mean``,
``rollout_seconds``, ``reward_seconds``, the previous step's ``update_seconds``, and at step 1,
every ``eval_every`` steps and at the last step ``eval_accuracy``: the mean reward of greedy
completions of the eval prompts (the accuracy when the reward is 0/1), with
``eval_accuracy/<domain>``. The entry of step s reports the eval of the params step s starts from
(after s - 1 updates); ``eval_every`` must be a multiple of ``log_every``, so those steps are logged.

Resume: the data position is the step. The rollout RNG is derived from the seed and the rollout's
first step; when a checkpoint falls inside a rollout's steps, the rollout batch itself is saved
beside it (``WORKDIR/rollouts/<step>.npz``), since its params are gone.

:func:`run` first runs a supervised phase on the rows' ``completion`` (up to ``grpo.sft_steps``,
the "sft" recipe in ``WORKDIR/sft``; ``grpo.sft_target_accuracy`` ends it once the greedy eval
accuracy reaches that value) when the run starts from nothing, then GRPO from its result.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsjax.checkpoint import CHECKPOINTS_SUBDIR, complete_steps
from dsjax.inference.rollout import (LocalEngine, RolloutEngine, Rollouts, SamplingParams, input_mask, policy_log_probs,
                                     routing_mismatch, score)
from dsjax.recipes import sft
from dsjax.recipes.grpo_data import PromptSet, load_prompt_sets, row_order
from dsjax.recipes.losses import masked_mean
from dsjax.rl import AGGREGATIONS, RATIO_LEVELS, get_reward, group_advantages, grpo_loss
from dsjax.rl.objective import ADVANTAGE_SCALES
from dsjax.train.config import as_dict, get, model_config_from, validate_train_config
from dsjax.train.loop import TrainResult, train
from dsjax.train.metrics import read_metrics
from dsjax.train.recipe import HOST_METRICS_PREFIX, Recipe

__all__ = ["SFT_DIR", "ROLLOUTS_DIR", "default_grpo_config", "GRPOSettings", "RewardSpec", "Rewards",
           "grpo_loss_fn", "ScoredSampler", "RolloutBatches", "recipe", "sft_config", "sft_recipe", "run"]

SFT_DIR = "sft"
ROLLOUTS_DIR = "rollouts"
_ROLLOUT_STREAM = 0x5EED  # folded into the seed's key: rollout randomness apart from init and steps
_MOE_STACK = "moe_layers"


def default_grpo_config() -> ml_collections.ConfigDict:
    """The ``grpo`` section of a GRPO config, with its defaults.

    Keys:
      num_samples: G, completions per prompt.
      prompts_per_rollout: P; a rollout batch holds P * G rows, a multiple of ``config.batch_size``.
      num_iterations: passes over each rollout batch (each in mini-batches of ``batch_size`` rows).
      max_new_tokens: N, the longest completion; prompt_width: prompts are left-padded to it (0:
        the longest prompt of the train and eval sets).
      temperature, top_p, top_k: the sampler's (temperature > 0).
      epsilon, epsilon_high (None: epsilon), off_policy_delta (None: no off-policy mask),
        aggregation, ratio_level, advantage_scale: see :func:`dsjax.rl.grpo_loss` /
        :func:`dsjax.rl.group_advantages`.
      kl_coef: beta, the KL weight of every domain; kl_coef_by_domain: ``{domain: beta}`` for the
        domains that differ (e.g. 0 for math).
      rewards: ``{label: {function, weight, domains, options}}``: ``function`` a built-in reward
        name (:data:`dsjax.rl.REWARDS`, :data:`dsjax.rl.REWARD_FACTORIES`; default: the label) or
        ``"module:attribute"``; ``options`` go to a factory; ``domains`` a comma-separated string
        or tuple ("": every domain).
      keep_routing: replay the sampler's experts in the loss; keep_sampling_mask: pi_theta over
        the sampler's kept set.
      eval_every: steps between evals (0: none); the eval prompts are ``config.prompts.eval``.
      update_router_biases: move router biases by the aux-loss-free rule during RL.
      sft_steps, sft_batch_size, sft_learning_rate: the supervised phase :func:`run` runs first
        from nothing (0 steps: none); sft_target_accuracy > 0 ends it early, once the greedy
        eval accuracy (checked every sft_eval_every steps) reaches it.
    """
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(dict(
        num_samples=8, prompts_per_rollout=16, num_iterations=1, max_new_tokens=16, prompt_width=0,
        temperature=1.0, top_p=1.0, top_k=0,
        epsilon=0.2, epsilon_high=placeholder(float), off_policy_delta=placeholder(float),
        aggregation="sequence_mean", ratio_level="token", advantage_scale="none",
        kl_coef=0.0, kl_coef_by_domain=ml_collections.ConfigDict(), rewards=ml_collections.ConfigDict(),
        keep_routing=True, keep_sampling_mask=True, eval_every=10, update_router_biases=False,
        sft_steps=0, sft_batch_size=32, sft_learning_rate=3e-3, sft_target_accuracy=0.0, sft_eval_every=25,
    ))


# ----------------------------------------------------------------------------------------------
# Settings and rewards
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    label: str
    function: Callable[..., list]
    weight: float
    domains: tuple[str, ...]  # () = every domain

    def applies(self, domain: str) -> bool:
        return not self.domains or domain in self.domains


def _reward_function(name: str, options: Mapping[str, Any]) -> Callable[..., list]:
    """A built-in reward by name, or ``module:attribute`` (called with ``options`` when given)."""
    if ":" not in name:
        return get_reward(name, **options)
    module, attribute = name.split(":", 1)
    function = getattr(importlib.import_module(module), attribute)
    return function(**options) if options else function


def _domains(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(d.strip() for d in value.split(",") if d.strip())
    return tuple(str(d) for d in value or ())


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """``config.grpo``, checked (see :func:`default_grpo_config`)."""

    num_samples: int
    prompts_per_rollout: int
    num_iterations: int
    max_new_tokens: int
    prompt_width: int
    temperature: float
    top_p: float
    top_k: int
    epsilon: float
    epsilon_high: Optional[float]
    off_policy_delta: Optional[float]
    aggregation: str
    ratio_level: str
    advantage_scale: str
    kl_coef: float
    kl_coef_by_domain: dict
    rewards: tuple[RewardSpec, ...]
    keep_routing: bool
    keep_sampling_mask: bool
    eval_every: int
    update_router_biases: bool
    sft_steps: int
    sft_batch_size: int
    sft_learning_rate: float
    sft_target_accuracy: float
    sft_eval_every: int

    @classmethod
    def from_config(cls, config: Any) -> "GRPOSettings":
        section = as_dict(config.get("grpo"))
        values = dict(default_grpo_config().to_dict(), **section)
        unknown = sorted(set(section) - set(default_grpo_config()))
        if unknown:
            raise ValueError(f"config.grpo.{unknown[0]}: unknown key (known: {', '.join(sorted(default_grpo_config()))})")

        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"config.grpo.{key}={values[key]!r}: {why}")

        for key in ("num_samples", "prompts_per_rollout", "num_iterations", "max_new_tokens"):
            need(isinstance(values[key], int) and values[key] >= 1, key, "must be an integer >= 1")
        for key in ("prompt_width", "top_k", "eval_every", "sft_steps", "sft_batch_size", "sft_eval_every"):
            need(isinstance(values[key], int) and values[key] >= 0, key, "must be an integer >= 0")
        need(values["temperature"] > 0, "temperature", "must be > 0 (GRPO samples its groups)")
        need(0 < values["top_p"] <= 1, "top_p", "must be in (0, 1]")
        need(values["aggregation"] in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
        need(values["ratio_level"] in RATIO_LEVELS, "ratio_level", f"must be one of {RATIO_LEVELS}")
        need(values["advantage_scale"] in ADVANTAGE_SCALES, "advantage_scale", f"must be one of {ADVANTAGE_SCALES}")
        for key in ("kl_coef", "kl_coef_by_domain"):
            kl = values[key]
            kl = dict(kl) if isinstance(kl, Mapping) else {"": kl}
            need(all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in kl.values()), key,
                 "must be a number >= 0" if key == "kl_coef" else "must map domains to numbers >= 0")
        need(isinstance(values["rewards"], Mapping) and values["rewards"], "rewards",
             "needs at least one reward: {label: {function, weight, domains}}")
        specs = []
        for label, spec in values["rewards"].items():
            spec = dict(spec)
            unknown = sorted(set(spec) - {"function", "weight", "domains", "options"})
            if unknown:
                raise ValueError(f"config.grpo.rewards.{label}: unknown key {unknown[0]!r} "
                                 "(function, weight, domains, options)")
            try:
                function = _reward_function(spec.get("function", label), dict(spec.get("options") or {}))
            except (ValueError, TypeError, ImportError, AttributeError) as e:
                raise ValueError(f"config.grpo.rewards.{label}: {e}") from None
            specs.append(RewardSpec(label, function, float(spec.get("weight", 1.0)), _domains(spec.get("domains"))))
        values["rewards"] = tuple(specs)
        values["kl_coef"] = float(values["kl_coef"])
        values["kl_coef_by_domain"] = {k: float(v) for k, v in dict(values["kl_coef_by_domain"]).items()}
        return cls(**values)

    def kl_for(self, domain: str) -> float:
        return self.kl_coef_by_domain.get(domain, self.kl_coef)

    def uses_kl(self, domains) -> bool:
        """Whether any of ``domains`` has a KL weight (then the reference policy is needed)."""
        return any(self.kl_for(domain) != 0 for domain in domains)


class Rewards:
    """The weighted sum of the reward functions that apply to each row's domain."""

    def __init__(self, specs: Sequence[RewardSpec]):
        self.specs = tuple(specs)

    def __call__(self, rows: Sequence[dict], completions: Sequence[str],
                 lengths: Sequence[int]) -> np.ndarray:
        """Total reward per row, float64 [R]. Each reward is called once, on the rows it applies
        to, TRL-style: ``function(prompts, completions, completion_lengths=..., **columns)``."""
        total = np.zeros(len(rows))
        for spec in self.specs:
            picked = [i for i, row in enumerate(rows) if spec.applies(row["domain"])]
            if not picked:
                continue
            names = {key for i in picked for key in rows[i] if key not in ("prompt", "messages")}
            columns = {key: [rows[i].get(key) for i in picked] for key in names}
            prompts = [rows[i].get("prompt", rows[i].get("messages")) for i in picked]
            values = spec.function(prompts, [completions[i] for i in picked],
                                   completion_lengths=[int(lengths[i]) for i in picked], **columns)
            values = np.asarray(values, np.float64)
            if values.shape != (len(picked),) or not np.isfinite(values).all():
                raise ValueError(f"reward {spec.label!r} must return one finite number for each of its "
                                 f"{len(picked)} completions, got {values.tolist()}")
            total[picked] += spec.weight * values
        return total


def _domain_means(name: str, prefix: str, values: np.ndarray, rows: Sequence[dict]) -> dict[str, float]:
    """{name: the mean, prefix/<domain>: the mean over the domain's rows}."""
    domains = np.array([row["domain"] for row in rows])
    out = {name: float(values.mean())}
    out.update({f"{prefix}/{d}": float(values[domains == d].mean()) for d in sorted(set(domains))})
    return out


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def grpo_loss_fn(settings: GRPOSettings, model_config: Any, *, use_kl: bool) -> Callable:
    """``loss(params, frozen, batch, rng) -> (loss, metrics, {})`` for :class:`RolloutBatches`' rows.

    ``use_kl``: score the frozen ``"reference"`` tree for the KL term (per-row weights
    ``batch["kl_coef"]``); False: no KL term and no reference forward pass.

    Metrics: :func:`dsjax.rl.grpo_loss`'s (kl, clip_fraction, off_policy_masked_fraction, ratio_*,
    ...), ``entropy`` (of pi_theta over the kept set, token mean) and ``routing_mismatch_rate``
    (share of token-expert choices a free forward pass of the current params makes differently
    from the sampler's; an extra forward without gradient when routing is replayed).
    """
    num_new = settings.max_new_tokens
    has_moe = model_config.num_layers > model_config.num_dense_layers

    def log_probs(params, batch, replay):
        logits, aux = score(params, model_config, batch["tokens"], batch["segment_ids"], num_new,
                            expert_indices=replay)
        cutoff = batch["truncation_cutoff"] if settings.keep_sampling_mask else None
        logp, entropy = policy_log_probs(logits, batch["tokens"][:, -num_new:], cutoff, settings.temperature)
        return logp, entropy, aux

    def loss(params, frozen, batch, rng):
        del rng
        replay = batch["expert_indices"] if settings.keep_routing and has_moe else None
        logp, entropy, aux = log_probs(params, batch, replay)
        ref_logp = None
        if use_kl:
            ref_logp = jax.lax.stop_gradient(log_probs(frozen["reference"], batch, replay)[0])
        total, metrics = grpo_loss(
            logp, batch["old_logprobs"], ref_logp, batch["advantages"], batch["mask"],
            epsilon=settings.epsilon, epsilon_high=settings.epsilon_high,
            kl_coef=batch["kl_coef"] if use_kl else 0.0, off_policy_delta=settings.off_policy_delta,
            aggregation=settings.aggregation, max_length=num_new, ratio_level=settings.ratio_level)
        metrics["entropy"] = masked_mean(jax.lax.stop_gradient(entropy), batch["mask"])
        metrics["routing_mismatch_rate"] = jnp.zeros((), jnp.float32)
        if has_moe:
            if replay is not None:
                aux = score(jax.lax.stop_gradient(params), model_config, batch["tokens"], batch["segment_ids"],
                            num_new)[1]
            valid = input_mask(batch["segment_ids"], batch["mask"])
            metrics["routing_mismatch_rate"] = routing_mismatch(
                jax.lax.stop_gradient(aux[_MOE_STACK]["expert_indices"]), batch["expert_indices"][_MOE_STACK], valid)
        metrics["loss"] = total
        return total, metrics, {}

    return loss


# ----------------------------------------------------------------------------------------------
# On-policy batches
# ----------------------------------------------------------------------------------------------


_ROLLOUT_ARRAYS = ("tokens", "segment_ids", "old_logprobs", "truncation_cutoff", "mask", "advantages", "kl_coef")


class ScoredSampler:
    """Completions from a rollout engine, scored by the rewards; the greedy eval."""

    def __init__(self, settings: GRPOSettings, engine: RolloutEngine, train_set: PromptSet,
                 eval_set: PromptSet | None):
        self.engine, self.eval_set, self.rewards = engine, eval_set, Rewards(settings.rewards)
        width = settings.prompt_width or max(s.max_prompt_length() for s in (train_set, eval_set) if s is not None)
        tokenizer = train_set.tokenizer
        self.sampling = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                       top_p=settings.top_p, top_k=settings.top_k, stop_tokens=(tokenizer.eos_id,),
                                       pad_token=tokenizer.pad_id, prompt_width=width)

    def sample(self, params: Any, prompts: PromptSet, indices: np.ndarray, num_samples: int, seed: Any, *,
               greedy: bool = False) -> tuple[Rollouts, np.ndarray, list[dict], float]:
        """(rollouts, total rewards [R], the rows they answer, seconds spent on rewards)."""
        sampling = dataclasses.replace(self.sampling, temperature=0.0, top_p=1.0, top_k=0) if greedy else self.sampling
        rollouts = self.engine.sample(params, [prompts.prompt_ids[i] for i in indices], num_samples=num_samples,
                                      sampling=sampling, seed=seed)
        start = time.perf_counter()
        rows = [prompts.rows[i] for i in indices for _ in range(num_samples)]
        completions = [prompts.text(ids) for ids in rollouts.completions()]
        return rollouts, self.rewards(rows, completions, rollouts.lengths), rows, time.perf_counter() - start

    def evaluate(self, params: Any) -> dict[str, float]:
        """``eval_accuracy`` (and per domain): the mean reward of greedy completions of the eval set."""
        start = time.perf_counter()
        _, rewards, rows, _ = self.sample(params, self.eval_set, np.arange(len(self.eval_set)), 1, 0, greedy=True)
        return dict(_domain_means("eval_accuracy", "eval_accuracy", rewards, rows),
                    eval_seconds=time.perf_counter() - start)


def _eval_due(step: int, every: int, num_steps: int) -> bool:
    """Evaluate the params of ``step`` (logged with step + 1): at the start, before every multiple
    of ``every`` (so that logged steps carry them) and before the last step."""
    return every > 0 and (step == 0 or (step + 1) % every == 0 or step == num_steps - 1)


class RolloutBatches:
    """The GRPO recipe's batches (see the module docstring): a rollout of the current params every
    ``steps_per_rollout`` steps, then its shuffled mini-batches."""

    def __init__(self, settings: GRPOSettings, train_set: PromptSet, sampler: ScoredSampler, *, batch_size: int,
                 num_steps: int, seed: int, workdir: str | None, keep_files: int, process_index: int,
                 process_count: int):
        if process_count != 1:
            raise NotImplementedError("the grpo recipe runs in one process (any number of local devices) for now")
        del process_index
        self.settings, self.train_set, self.sampler = settings, train_set, sampler
        rows = settings.prompts_per_rollout * settings.num_samples
        if rows % batch_size:
            raise ValueError(f"config.batch_size={batch_size}: must divide the rollout batch "
                             f"(grpo.prompts_per_rollout x grpo.num_samples = {rows} rows)")
        self.batch_size, self.mini_batches = batch_size, rows // batch_size
        self.steps_per_rollout = settings.num_iterations * self.mini_batches
        self.num_steps, self.seed, self.workdir, self.keep_files = num_steps, seed, workdir, keep_files
        self.kl_coef = np.array([settings.kl_for(row["domain"]) for row in train_set.rows], np.float32)
        self.rollout: dict | None = None  # arrays, expert_indices, metrics, step
        self.restored: dict | None = None  # the data state of a restored checkpoint
        self.next_step: int | None = None  # the step whose batch the next call makes
        self.returned_at: float | None = None

    def _new_rollout(self, params: Any, step: int) -> dict:
        settings = self.settings
        start = time.perf_counter()
        number = step // self.steps_per_rollout
        indices = row_order(len(self.train_set), self.seed, number * settings.prompts_per_rollout,
                            settings.prompts_per_rollout)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _ROLLOUT_STREAM), number)
        rollouts, rewards, rows, reward_seconds = self.sampler.sample(params, self.train_set, indices,
                                                                      settings.num_samples, key)
        advantages = group_advantages(rewards.reshape(-1, settings.num_samples), settings.advantage_scale)
        arrays = dict(rollouts._asdict(), advantages=np.asarray(advantages, np.float32).reshape(-1),
                      kl_coef=np.repeat(self.kl_coef[indices], settings.num_samples))
        metrics = dict(_domain_means("reward_mean", "reward", rewards, rows),
                       response_length_mean=float(rollouts.lengths.mean()), reward_seconds=reward_seconds,
                       rollout_seconds=time.perf_counter() - start - reward_seconds)
        return dict(step=step, arrays={k: arrays[k] for k in _ROLLOUT_ARRAYS}, metrics=metrics,
                    expert_indices=rollouts.expert_indices)

    # -- the Batches interface

    def next(self, state: dict) -> dict:
        step = int(state["step"])
        params = jax.block_until_ready(state["params"])  # the step before has finished: time it
        now = time.perf_counter()
        update_seconds = 0.0 if self.returned_at is None else now - self.returned_at
        first = step - step % self.steps_per_rollout
        if self.rollout is None or self.rollout["step"] != first:
            if self.restored is not None and self.restored["rollout_step"] == first:
                self.rollout = self._load(self.restored["rollout_file"])
            elif step != first:
                raise RuntimeError(f"step {step} trains on the rollout of step {first}, which was not saved")
            else:
                self.rollout = self._new_rollout(params, step)
        metrics = dict(self.rollout["metrics"], update_seconds=update_seconds)
        if self.sampler.eval_set is not None and _eval_due(step, self.settings.eval_every, self.num_steps):
            metrics.update(self.sampler.evaluate(params))
        iteration, mini_batch = divmod(step - first, self.mini_batches)
        order = np.random.default_rng([self.seed, first, iteration]).permutation(self.mini_batches * self.batch_size)
        picked = order[mini_batch * self.batch_size:(mini_batch + 1) * self.batch_size]
        batch = {key: value[picked] for key, value in self.rollout["arrays"].items()}
        batch["expert_indices"] = {key: value[picked] for key, value in self.rollout["expert_indices"].items()}
        batch.update({HOST_METRICS_PREFIX + name: value for name, value in metrics.items()})
        self.next_step = step + 1
        self.returned_at = time.perf_counter()
        return batch

    def get_state(self) -> dict:
        """Where the data stands: the rollout being trained on, saved when the next step needs it."""
        if self.rollout is None or self.next_step is None or self.next_step % self.steps_per_rollout == 0:
            return dict(rollout_step=None, rollout_file=None)
        return dict(rollout_step=self.rollout["step"], rollout_file=self._save(self.rollout))

    def set_state(self, state: dict) -> None:
        self.restored = state if state.get("rollout_file") else None

    # -- rollout files

    def _save(self, rollout: dict) -> str:
        if self.workdir is None:
            raise ValueError("the grpo recipe needs a workdir to checkpoint inside a rollout's steps")
        directory = os.path.join(self.workdir, ROLLOUTS_DIR)
        name = f"{rollout['step']}.npz"
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            os.makedirs(directory, exist_ok=True)
            arrays = dict(rollout["arrays"], **{f"expert_indices/{k}": v for k, v in rollout["expert_indices"].items()},
                          **{f"metrics/{k}": np.float64(v) for k, v in rollout["metrics"].items()})
            with open(path + ".tmp", "wb") as f:
                np.savez(f, **arrays)
            os.replace(path + ".tmp", path)
            saved = sorted(int(n[:-4]) for n in os.listdir(directory) if n.endswith(".npz"))
            for old in saved[:-self.keep_files] if self.keep_files else []:
                os.remove(os.path.join(directory, f"{old}.npz"))
        return name

    def _load(self, name: str) -> dict:
        with np.load(os.path.join(self.workdir, ROLLOUTS_DIR, name)) as data:
            groups = {"arrays": {}, "expert_indices": {}, "metrics": {}}
            for key in data.files:
                group, _, field = key.partition("/") if "/" in key else ("arrays", "", key)
                groups[group][field] = data[key]
        groups["metrics"] = {k: float(v) for k, v in groups["metrics"].items()}
        return dict(step=int(name[:-4]), **groups)


# ----------------------------------------------------------------------------------------------
# Recipe and run
# ----------------------------------------------------------------------------------------------


def recipe(config: Any, workdir: str | None = None, *, engine: RolloutEngine | None = None) -> Recipe:
    """The GRPO recipe for ``config`` (``grpo``, ``prompts``, the model); ``workdir`` holds the rollout
    files of checkpoints taken inside a rollout's steps. ``engine``: None samples with
    :class:`LocalEngine` on the params' mesh."""
    settings = GRPOSettings.from_config(config)
    model_config = ml_collections.FrozenConfigDict(model_config_from(config))
    train_set, eval_set = load_prompt_sets(config)
    sampler = ScoredSampler(settings, engine or LocalEngine(model_config), train_set, eval_set)
    use_kl = settings.uses_kl({row["domain"] for row in train_set.rows})
    log_every = int(get(config, "log_every"))
    if settings.eval_every % log_every:
        raise ValueError(f"config.grpo.eval_every={settings.eval_every}: must be a multiple of "
                         f"config.log_every={log_every} (0: no evals), so that the evals are logged")

    def batches(config, process_index, process_count):
        return RolloutBatches(settings, train_set, sampler, batch_size=int(get(config, "batch_size")),
                              num_steps=int(get(config, "num_steps")), seed=int(get(config, "seed")),
                              workdir=workdir, keep_files=int(get(config, "keep_checkpoints") or 0),
                              process_index=process_index, process_count=process_count)

    return Recipe(loss=grpo_loss_fn(settings, model_config, use_kl=use_kl), batches=batches,
                  frozen=(lambda params: {"reference": params}) if use_kl else None,
                  update_router_biases=settings.update_router_biases)


# ----------------------------------------------------------------------------------------------
# The supervised phase, then GRPO
# ----------------------------------------------------------------------------------------------


class _UntilAccurate:
    """The supervised phase's batches, with evals: they end (None, so the loop saves and stops) once
    the greedy eval accuracy of the params reaches ``target``; ``outcome`` records where."""

    def __init__(self, inner: Any, sampler: ScoredSampler, *, target: float, every: int, num_steps: int,
                 outcome: dict):
        self.inner, self.sampler, self.target, self.every, self.num_steps = inner, sampler, target, every, num_steps
        self.outcome = outcome

    def next(self, state: dict) -> Optional[dict]:
        step = int(state["step"])
        metrics = {}
        if _eval_due(step, self.every, self.num_steps):
            metrics = self.sampler.evaluate(state["params"])
            self.outcome.update(step=step, eval_accuracy=metrics["eval_accuracy"])
            if metrics["eval_accuracy"] >= self.target:
                return None
        batch = self.inner.next(state)
        return dict(batch, **{HOST_METRICS_PREFIX + name: value for name, value in metrics.items()})

    def get_state(self) -> Any:
        return self.inner.get_state()

    def set_state(self, state: Any) -> None:
        self.inner.set_state(state)


def sft_config(config: Any) -> Any:
    """The supervised phase's config: the same model and prompts, the "sft" recipe on the rows'
    completions for up to ``grpo.sft_steps`` steps of ``grpo.sft_batch_size`` rows."""
    settings = GRPOSettings.from_config(config)
    phase = config.copy_and_resolve_references()
    with phase.unlocked():
        phase.recipe = "sft"
        phase.num_steps = settings.sft_steps
        phase.batch_size = settings.sft_batch_size
        phase.optimizer.learning_rate = settings.sft_learning_rate
        phase.optimizer.decay_steps = settings.sft_steps
        phase.optimizer.warmup_steps = min(phase.optimizer.warmup_steps, max(settings.sft_steps // 10, 1))
        phase.log_every = settings.sft_eval_every if settings.sft_target_accuracy else max(settings.sft_steps // 10, 1)
        phase.checkpoint_every = max(settings.sft_steps // 4, 1)
    return phase


def sft_recipe(phase: Any, outcome: dict) -> Recipe:
    """The "sft" recipe for the supervised phase's config, ending early (see :class:`_UntilAccurate`)
    when ``grpo.sft_target_accuracy`` > 0 and there are eval prompts; ``outcome`` gets the last eval."""
    settings = GRPOSettings.from_config(phase)
    supervised = sft.recipe(phase)
    train_set, eval_set = load_prompt_sets(phase)
    if not settings.sft_target_accuracy or eval_set is None:
        return supervised
    sampler = ScoredSampler(settings, LocalEngine(model_config_from(phase)), train_set, eval_set)

    def batches(config, process_index, process_count):
        return _UntilAccurate(supervised.batches(config, process_index, process_count), sampler,
                              target=settings.sft_target_accuracy, every=settings.sft_eval_every,
                              num_steps=settings.sft_steps, outcome=outcome)

    return dataclasses.replace(supervised, batches=batches)


def _eval_summary(workdir: str) -> str | None:
    evals = [(e["step"], e["eval_accuracy"]) for e in read_metrics(workdir) if "eval_accuracy" in e]
    if not evals:
        return None
    (first_step, first), (last_step, last) = evals[0], evals[-1]
    return (f"eval_accuracy {first:.3f} (params after {first_step - 1} steps) -> {last:.3f} "
            f"(after {last_step - 1} steps): {100 * (last - first):+.1f} points")


def run(config: Any, workdir: str, **kwargs) -> TrainResult:
    """GRPO with ``config`` in ``workdir``, after the supervised phase when one is due (``grpo.sft_steps``
    > 0, no ``init_from`` and no checkpoint in ``workdir`` yet; it runs in ``WORKDIR/sft``, is itself
    resumable, and GRPO starts from its last checkpoint). ``kwargs``: see :func:`dsjax.train.loop.train`."""
    validate_train_config(config)
    settings = GRPOSettings.from_config(config)
    grpo_recipe = recipe(config, workdir)  # bad settings or prompts fail here, before anything runs
    print_fn = kwargs.get("print_fn", print)
    say = print_fn if print_fn and jax.process_index() == 0 else (lambda text: None)
    if settings.sft_steps > 0 and not config.init_from and not complete_steps(os.path.join(workdir, CHECKPOINTS_SUBDIR)):
        sft_dir = os.path.join(workdir, SFT_DIR)
        target = settings.sft_target_accuracy
        say(f"No init_from: up to {settings.sft_steps} supervised steps first, in {sft_dir}"
            + (f", until eval_accuracy >= {target}" if target else ""))
        outcome: dict = {}
        phase = sft_config(config)
        train(phase, sft_dir, sft_recipe(phase, outcome), **kwargs)
        if outcome:
            say(f"Supervised phase: eval_accuracy {outcome['eval_accuracy']:.3f} after {outcome['step']} steps")
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.init_from = sft_dir
        say(f"GRPO from {sft_dir}")
    result = train(config, workdir, grpo_recipe, **kwargs)
    summary = _eval_summary(workdir)
    if summary:
        say(summary)
    return result
