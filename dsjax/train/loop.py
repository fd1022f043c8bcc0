"""The training loop every recipe shares: ``train(config, workdir, recipe)``.

``config`` is a training config (:func:`dsjax.train.config.default_train_config`); ``recipe``
(:class:`dsjax.train.recipe.Recipe`) says what is trained on what: its loss, batches, frozen
trees, trainable leaves and whether router biases move. The loop knows no recipe by name.

Host loop: a fresh run creates the params in their shards (``recipe.init_params``, else random or
``config.init_from``) and the recipe's frozen trees from them; a workdir with a checkpoint
resumes from the newest one (params, optimizer state, frozen trees, step, data position), on
whatever mesh this run uses. Each step takes ``recipe.batches(...).next(state)`` and runs the
jitted step (:mod:`dsjax.train.step`); the loss and gradient norm are read back every step (a
NaN/Inf stops the run with :class:`NonFiniteError` before anything of that step is saved); every
``log_every`` steps a line goes to the console, ``metrics.jsonl`` and TensorBoard (that step's
metrics, ``tokens_per_s`` over the interval without compile time, ``loss_avg`` over the
interval); every ``checkpoint_every`` steps and at the last step the state is saved.

Restarting from a checkpoint reproduces an uninterrupted run exactly: step s uses the s-th batch
(the data position is checkpointed) and the key ``fold_in(step_key(seed), s - 1)``.

Devices: the step runs on a mesh (``config.mesh``, see :mod:`dsjax.parallel`; default: data
parallel over every device). Parameters and frozen trees are sharded by the model's rules, the
optimizer state like the parameters, and each process reads its own ``batch_size /
process_count`` rows. Multi-process runs (SLURM, TPU pods, ``JAX_COORDINATOR_ADDRESS``) start
JAX's distributed runtime first (:func:`dsjax.parallel.distributed.maybe_initialize`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from dsjax import parallel
from dsjax.checkpoint import Checkpointer
from dsjax.model import param_shardings
from dsjax.model import init_params as model_init_params
from dsjax.parallel import distributed
from dsjax.train import metrics as metrics_lib
from dsjax.train import optim
from dsjax.train.config import (get, model_config_from, run_mesh, to_json, validate_optimizer_config,
                                validate_train_config)
from dsjax.train.init import initial_params
from dsjax.train.recipe import HOST_METRICS_PREFIX, Recipe
from dsjax.train.step import init_key, init_train_state, make_train_step

__all__ = ["NonFiniteError", "TrainResult", "train"]

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN/Inf; the run stopped without saving that step."""


@dataclasses.dataclass
class TrainResult:
    step: int  # optimizer steps done (== num_steps unless the data ran out or nothing was left to do)
    state: dict  # {"params", "opt_state", "step"} (+ "frozen")
    metrics: dict  # the last step's metrics (host floats); {} if no step ran
    model_config: Any


def train(config: Any, workdir: str, recipe: Recipe, *, print_fn: Optional[Callable[[str], None]] = print,
          mesh: Optional[jax.sharding.Mesh] = None) -> TrainResult:
    """Trains (or resumes training) up to ``config.num_steps`` optimizer steps.

    Args:
      config: training config (:func:`dsjax.train.config.default_train_config`).
      workdir: run directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
        ``config.json``.
      recipe: what to train (:mod:`dsjax.train.recipe`; the shipped ones are in
        :mod:`dsjax.recipes`).
      print_fn: console output (one progress line per logged step); None: silent.
      mesh: a ``jax.sharding.Mesh`` with the axes of :mod:`dsjax.parallel` to run on instead of
        the one ``config.mesh`` describes (e.g. a mesh over a subset of the devices).

    Raises:
      NonFiniteError: a NaN/Inf loss or gradient norm (naming the step and the quantity); the
        state of that step is not saved, earlier checkpoints stay.
    """
    distributed.maybe_initialize()  # before anything touches a device
    validate_train_config(config)
    model_config = model_config_from(config)
    if model_config.param_dtype != "float32":
        log.warning("model.param_dtype=%r: master weights and Adam moments are kept in it; float32 is "
                    "the recommended training setting", model_config.param_dtype)
    seed, num_steps = int(get(config, "seed")), int(get(config, "num_steps"))
    log_every, checkpoint_every = int(get(config, "log_every")), int(get(config, "checkpoint_every"))
    opt_cfg = get(config, "optimizer")
    accumulation_steps = validate_optimizer_config(opt_cfg)["accumulation_steps"]
    mesh = run_mesh(config) if mesh is None else mesh
    _check_batch_split(int(get(config, "batch_size")), accumulation_steps, mesh)
    primary = jax.process_index() == 0

    # The state's shapes and shardings: params and frozen trees by the model's rules, the
    # optimizer state like the params, scalars replicated.
    make_params = recipe.init_params or model_init_params
    abstract_params = jax.eval_shape(lambda: make_params(model_config, init_key(seed)))
    tx = optim.make_optimizer(opt_cfg, abstract_params, recipe.trainable)
    params_shardings = param_shardings(model_config, mesh, like=abstract_params)
    abstract_frozen = jax.eval_shape(recipe.frozen, abstract_params) if recipe.frozen else {}
    frozen_shardings = {name: param_shardings(model_config, mesh, like=tree) for name, tree in abstract_frozen.items()}
    abstract_state = jax.eval_shape(lambda p, f: init_train_state(p, tx, f), abstract_params, abstract_frozen)
    shardings = parallel.state_shardings(abstract_state, params_shardings, mesh)
    if frozen_shardings:
        shardings["frozen"] = frozen_shardings

    batches = recipe.batches(config, jax.process_index(), jax.process_count())
    data_state = batches if hasattr(batches, "get_state") and hasattr(batches, "set_state") else None
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(workdir, keep=get(config, "keep_checkpoints") or None,
                                async_save=bool(get(config, "async_checkpointing")))
    writer = None
    try:
        start_step = checkpointer.latest_step()
        if start_step is not None:  # restored straight into this run's shardings, whatever mesh wrote it
            target = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                  abstract_state, shardings)
            state = checkpointer.restore(start_step, target, data_iterator=data_state)
        else:
            params = initial_params(config, model_config, init_key(seed), shardings=params_shardings,
                                    init_fn=recipe.init_params)
            frozen = _place_copy(recipe.frozen(params), frozen_shardings) if recipe.frozen else {}
            state = jax.jit(lambda p, f: init_train_state(p, tx, f), out_shardings=shardings)(params, frozen)
            if primary:
                with open(os.path.join(workdir, "config.json"), "w") as f:
                    json.dump(to_json(config), f, indent=2)
        step = int(state["step"])
        writer = metrics_lib.MetricsWriter(workdir, resume_step=step, tensorboard=bool(get(config, "tensorboard")),
                                           print_fn=print_fn if primary else None, primary=primary)
        if start_step is not None:
            no_position = "" if data_state is not None else "; the batches have no position to restore (no get_state)"
            writer.message(f"Resuming from step {step} ({checkpointer.step_dir(start_step)}){no_position}")
        if step >= num_steps:
            writer.message(f"Nothing to do: step {step} >= num_steps={num_steps}")
            return TrainResult(step, state, {}, model_config)

        rate = get(config, "router_bias_update_rate") if recipe.update_router_biases else 0.0
        train_step = make_train_step(recipe.loss, tx, seed=seed, accumulation_steps=accumulation_steps,
                                     router_bias_update_rate=rate, schedule=optim.make_schedule(opt_cfg),
                                     trainable_mask=optim.trainable_mask(abstract_params, recipe.trainable),
                                     mesh=mesh, state_shardings=shardings)
        save = lambda step, **kw: checkpointer.save(step, state, data_iterator=data_state,  # noqa: E731
                                                    config=to_json(config), **kw)
        throughput = metrics_lib.Throughput(num_steps)
        last_saved = checkpointer.latest_step()
        host_metrics: dict = {}
        interval_losses: list[float] = []  # since the previous log line
        batch = batches.next(state)
        while step < num_steps:
            if batch is None:
                writer.message(f"The data ran out after step {step}; stopping there.")
                if last_saved != step:
                    save(step, force=True)
                break
            batch, batch_metrics = _split_host_metrics(batch)
            tokens = _batch_tokens(batch) * jax.process_count()  # every process reads as many rows
            state, metrics = train_step(state, batch)
            step += 1
            save_now = step % checkpoint_every == 0 or step == num_steps
            # Off-policy data: read while the step runs on the devices. At a checkpoint, only after
            # saving, so that the saved data position is that of the saved state.
            batch = None if save_now else batches.next(state)
            host_metrics = dict(batch_metrics, **{name: float(value) for name, value in jax.device_get(metrics).items()})
            _check_finite(host_metrics, step, last_saved, checkpointer)
            throughput.step_done(step, tokens)
            interval_losses.append(host_metrics.get("loss", float("nan")))
            if step % log_every == 0 or step == num_steps or step == 1:
                tokens_per_s, eta = throughput.log(step)
                host_metrics.update(tokens_per_s=tokens_per_s, loss_avg=float(np.mean(interval_losses)))
                interval_losses = []
                writer.write(step, host_metrics, line=metrics_lib.format_progress(step, num_steps, host_metrics, eta))
            if save_now:
                if save(step):
                    last_saved = step
                if step < num_steps:
                    batch = batches.next(state)
        checkpointer.wait()
        writer.message(f"Done: step {step}; checkpoints in {checkpointer.directory}")
        return TrainResult(step, state, host_metrics, model_config)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()


def _check_batch_split(batch_size: int, accumulation_steps: int, mesh: jax.sharding.Mesh) -> None:
    shards = parallel.batch_shards(mesh)
    if batch_size % (accumulation_steps * shards):
        raise ValueError(f"config.batch_size={batch_size}: must be divisible by optimizer.accumulation_steps="
                         f"{accumulation_steps} x the mesh's batch shards (data x fsdp x expert = {shards}), so that "
                         f"every micro-batch splits evenly over the devices (mesh {dict(mesh.shape)})")
    if shards % jax.process_count():
        raise ValueError(f"config.mesh: the batch is split {shards} ways, which does not divide among "
                         f"{jax.process_count()} processes; put process-spanning devices on data/fsdp/expert "
                         f"(mesh {dict(mesh.shape)})")


def _place_copy(tree: Any, shardings: Any) -> Any:
    """``tree`` in ``shardings``, in buffers of its own (a frozen tree may be made of the params,
    which the step donates)."""
    def one(leaf, sharding):
        if isinstance(leaf, jax.Array):
            return jax.device_put(leaf, sharding, may_alias=False)
        return parallel.place(np.asarray(leaf), sharding)

    return jax.tree.map(one, tree, shardings)


def _check_finite(metrics: Mapping[str, float], step: int, last_saved: Optional[int], checkpointer) -> None:
    bad = [name for name in ("loss", "grad_norm") if name in metrics and not math.isfinite(metrics[name])]
    if bad:
        where = (f"the last good checkpoint is step {last_saved} ({checkpointer.step_dir(last_saved)})"
                 if last_saved is not None else "no checkpoint was saved")
        values = ", ".join(f"{name}={metrics.get(name)}" for name in ("loss", "grad_norm"))
        raise NonFiniteError(f"Non-finite {' and '.join(bad)} at step {step} ({values}); stopping "
                             f"without saving this step's state: {where}.")


def _split_host_metrics(batch: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, float]]:
    """(the batch without its ``metrics/<name>`` entries, those entries as {name: float}): values the
    batches computed on the host (e.g. rewards, timings), logged with the step that trains on the batch."""
    names = [key for key in batch if isinstance(key, str) and key.startswith(HOST_METRICS_PREFIX)]
    if not names:
        return batch, {}
    host = {key[len(HOST_METRICS_PREFIX):]: float(batch[key]) for key in names}
    return {key: value for key, value in batch.items() if key not in names}, host


def _batch_tokens(batch: Mapping[str, Any]) -> int:
    if "tokens" in batch:
        return int(np.prod(np.shape(batch["tokens"])))
    return int(np.prod(np.shape(jax.tree.leaves(batch)[0])[:2]))
