"""The jitted train step: ``(state, batch) -> (new state, metrics)``, one optimizer step.

1. The batch ``[B, ...]`` is split into ``accumulation_steps = k`` micro-batches ``[k, B / k,
   ...]``; a ``lax.scan`` computes the loss and gradient of each (micro-batch rng
   ``fold_in(step_rng, i)``), summing gradients, metrics and expert loads; gradients and metrics
   are then divided by k. One call is one optimizer step, so checkpoints, the data position,
   the learning rate, logging and the router-bias update all line up with optimizer steps; the
   result equals one AdamW step on the mean of the k micro-batch gradients (each a mean over
   that micro-batch's tokens).
2. ``grad_norm`` = global norm of the trainable gradients (before clipping); the optimizer
   (:func:`dsjax.train.optim.make_optimizer`) clips, applies AdamW and never touches router biases.
3. Aux-loss-free balancing: every router bias then moves by ``router_bias_update_rate *
   sign(mean(load) - load)`` per layer, with this step's expert loads (summed over
   micro-batches; :func:`dsjax.model.router.update_router_biases`). Rate 0 disables it.

The state is ``{"params", "opt_state", "step"}``, plus ``"frozen"`` (``{name: tree}``) when the
recipe has frozen trees: they reach the loss as an argument and come back unchanged (donated
with the state, so their buffers are reused in place, never copied).

Randomness: the step that turns ``state["step"]`` from s - 1 into s uses the key
``fold_in(split(key(seed))[1], s - 1)``; initial params use ``split(key(seed))[0]``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from dsjax import parallel
from dsjax.model.router import expert_loads, update_router_biases
from dsjax.train import metrics as metrics_lib
from dsjax.train.recipe import LossFn

__all__ = ["init_key", "step_key", "init_train_state", "make_train_step"]


def init_key(seed: int) -> jax.Array:
    return jax.random.split(jax.random.key(int(seed)))[0]


def step_key(seed: int) -> jax.Array:
    return jax.random.split(jax.random.key(int(seed)))[1]


def init_train_state(params: Any, tx: optax.GradientTransformation, frozen: Optional[dict] = None) -> dict:
    """``{"params", "opt_state", "step"}`` for given initial params, with ``"frozen"`` if any."""
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    if frozen:
        state["frozen"] = frozen
    return state


def make_train_step(loss_fn: LossFn,
                    tx: optax.GradientTransformation,
                    *,
                    seed: int = 0,
                    accumulation_steps: int = 1,
                    router_bias_update_rate: float = 0.0,
                    schedule: Optional[optax.Schedule] = None,
                    trainable_mask: Any = None,
                    jit: bool = True,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    state_shardings: Any = None) -> Callable[[dict, dict], tuple[dict, dict]]:
    """The train step ``(state, batch) -> (new_state, metrics)`` (see the module doc).

    Args:
      loss_fn: ``(params, frozen, batch, rng) -> (loss, metrics, aux)`` (:mod:`dsjax.train.recipe`).
      tx: from :func:`dsjax.train.optim.make_optimizer`.
      seed: the run's seed; step s - 1 -> s uses ``fold_in(step_key(seed), s - 1)``.
      accumulation_steps: micro-batches per step; every batch leaf's leading axis must divide by it.
      router_bias_update_rate: gamma of the router-bias update (0: off).
      schedule: learning-rate schedule, only to report ``lr``.
      trainable_mask: pytree of bools like params (True: counted in ``grad_norm``); None: all.
      jit: return the jitted step (state donated) or the plain function.
      mesh: run on this mesh (needs ``jit``). The step then takes this process's rows of the
        batch (host or device arrays) and assembles the global batch split over the batch axes
        (:func:`dsjax.parallel.place_batch`); it is jitted with explicit in/out shardings and runs
        under ``jax.set_mesh(mesh)``, so MoE layers use expert parallelism over the ``expert``
        axis. Micro-batches stay split over the batch axes.
      state_shardings: a pytree like the state of ``NamedSharding``s on ``mesh``; the state is
        kept in them. None: the shardings of the first state passed in.

    Returns:
      The step. Its metrics: the loss function's (mean over micro-batches), ``grad_norm``, ``lr``
      (if ``schedule``), ``expert_load_max_over_mean``, ``expert_load_min_over_mean``; on a mesh
      with an ``expert`` axis of size P > 1 also ``expert_shard_load_max_over_mean``: per MoE
      layer, the token copies each expert shard (device group) receives, max over shards / mean,
      the largest over layers (what bounds the all-to-all and the expert matmuls of the busiest
      device).
    """
    k = int(accumulation_steps)
    rate = float(router_bias_update_rate)
    key = step_key(seed)

    def grads_of(params, frozen, batch, rng):
        def wrapped(p):
            loss, metrics, aux = loss_fn(p, frozen, batch, rng)
            return loss, (metrics, expert_loads(aux))

        (loss, (metrics, loads)), grads = jax.value_and_grad(wrapped, has_aux=True)(params)
        metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
        metrics.setdefault("loss", jnp.asarray(loss, jnp.float32))
        loads = {name: jax.lax.stop_gradient(value).astype(jnp.float32) for name, value in loads.items()}
        return grads, metrics, loads

    def step_fn(state, batch):
        params, frozen = state["params"], state.get("frozen", {})
        rng = jax.random.fold_in(key, state["step"])
        if k == 1:
            grads, metrics, loads = grads_of(params, frozen, batch, jax.random.fold_in(rng, 0))
        else:
            def split(x):
                x = jnp.asarray(x)
                if x.shape[0] % k:
                    raise ValueError(f"batch leading axis {x.shape[0]} does not divide into {k} micro-batches")
                return x.reshape((k, x.shape[0] // k) + x.shape[1:])

            micro = jax.tree.map(split, batch)
            if mesh is not None:  # keep each micro-batch split over the batch axes (one cheap reshard)
                micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, _micro_sharding(mesh, x.ndim)),
                                     micro)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(lambda b: grads_of(params, frozen, b, rng), first)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(carry, inputs):
                index, micro_batch = inputs
                out = grads_of(params, frozen, micro_batch, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, out), None

            (grads, metrics, loads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
            grads = jax.tree.map(lambda g: g / k, grads)
            metrics = jax.tree.map(lambda m: m / k, metrics)

        if trainable_mask is None:
            counted = jax.tree.leaves(grads)
        else:
            counted = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable_mask)) if t]
        grad_norm = optax.global_norm(counted) if counted else jnp.zeros((), jnp.float32)

        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = update_router_biases(optax.apply_updates(params, updates), loads, rate)

        metrics = dict(metrics, grad_norm=grad_norm)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        metrics.update(metrics_lib.expert_load_stats(loads))
        if mesh is not None and mesh.shape["expert"] > 1:
            metrics.update(_expert_shard_load_stats(loads, mesh.shape["expert"]))
        return dict(state, params=new_params, opt_state=opt_state, step=state["step"] + 1), metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0) if jit else step_fn
    if not jit:
        raise ValueError("make_train_step(mesh=...) needs jit=True")
    return _MeshStep(step_fn, mesh, state_shardings)


def _micro_sharding(mesh, ndim: int) -> jax.sharding.NamedSharding:
    """[k, B / k, ...] micro-batches: the B / k rows split like a batch."""
    spec = parallel.batch_sharding(mesh, max(ndim - 1, 1)).spec
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec))


def _expert_shard_load_stats(loads: Mapping[str, jax.Array], num_shards: int) -> dict[str, jax.Array]:
    highs = []
    for load in loads.values():
        if load.shape[-1] % num_shards:
            continue  # experts not split over the `expert` axis (replicated): no per-device imbalance
        per_shard = jnp.sum(load.reshape(load.shape[:-1] + (num_shards, -1)), axis=-1).reshape(-1, num_shards)
        highs.append(jnp.max(per_shard, axis=-1) / jnp.maximum(jnp.mean(per_shard, axis=-1), 1e-9))
    if not highs:
        return {}
    return dict(expert_shard_load_max_over_mean=jnp.max(jnp.concatenate(highs)))


class _MeshStep:
    """The train step on a mesh: places the batch, keeps the state in its shardings, sets the mesh."""

    def __init__(self, step_fn, mesh, state_shardings):
        self._step_fn = step_fn
        self.mesh = mesh
        self.state_shardings = state_shardings
        self.jitted = {}  # batch structure and shardings -> jitted step

    def __call__(self, state, batch):
        batch = parallel.place_batch(batch, self.mesh)
        if self.state_shardings is None:
            self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
        state = jax.device_put(state, self.state_shardings)  # no copy where already in place
        key = (jax.tree.structure(batch), tuple(x.sharding for x in jax.tree.leaves(batch)))
        jitted = self.jitted.get(key)
        if jitted is None:
            jitted = self.jitted[key] = jax.jit(
                self._step_fn, donate_argnums=0,
                in_shardings=(self.state_shardings, jax.tree.map(lambda x: x.sharding, batch)),
                out_shardings=(self.state_shardings, parallel.replicated(self.mesh)))
        with jax.set_mesh(self.mesh):
            return jitted(state, batch)
