"""The training loop every dsjax recipe shares.

    result = train(config, workdir)                       # pre-training (the default loss)
    result = train(config, workdir, loss_fn=my_loss,      # another recipe: swap the loss,
                   dataset=my_data, trainable=my_mask)    # the data, the trained leaves

``config`` is a ConfigDict like :func:`default_train_config` (``configs/base.py``
builds on it). ``loss_fn(params, batch, model_config, rng) -> (loss, metrics,
aux)`` is a pure function (see :mod:`dsjax.train.losses`).

One optimizer step (``make_train_step``, jitted, the train state donated):

1. the batch ``[B, ...]`` is split into ``optimizer.accumulation_steps = k``
   micro-batches ``[k, B / k, ...]``; a ``lax.scan`` computes the loss and
   gradient of each (micro-batch rng ``fold_in(step_rng, i)``), summing
   gradients, metrics and expert loads; gradients and metrics are then divided
   by k. Accumulating inside the step (rather than calling a
   ``MultiSteps`` optimizer once per micro-batch) keeps every call one full
   optimizer step, so checkpoints, the data-iterator state, learning rate,
   logging and the router-bias update all line up with optimizer steps. The
   optimizer is therefore built with ``accumulation_steps = 1``; the result
   equals one AdamW step on the mean of the k micro-batch gradients (each a
   mean over that micro-batch's tokens).
2. ``grad_norm`` = global norm of the trainable gradients (before clipping);
   ``make_optimizer`` clips, applies AdamW and never touches router biases.
3. Aux-loss-free balancing: every router bias then moves by
   ``router_bias_update_rate * sign(mean(load) - load)`` per layer, with this
   step's expert loads (summed over micro-batches). Rate 0 disables it.

Numerics: parameters (and Adam moments) stay in the model config's
``param_dtype`` (float32 master weights by default); the model computes in its
``dtype`` (set ``model.dtype = "bfloat16"`` on accelerators). Rematerialisation
follows the model config's ``remat_policy`` ("none" / "full" / "dots").

Step numbering and randomness: ``state["step"]`` counts finished optimizer
steps; the step that turns it from s - 1 into s is logged as step s, uses the
s-th batch and the key ``fold_in(split(key(seed))[1], s - 1)``. Initial params
use ``split(key(seed))[0]``. Restarting from a checkpoint thus reproduces an
uninterrupted run exactly (the data iterator state is checkpointed too).

Devices: the step runs on a mesh (``config.mesh``, see
:mod:`dsjax.parallel`; default: data parallel over every device). Parameters
are created in their shards (never whole on one device), the optimizer state
is sharded like the parameters (scalars replicated), each process reads its
own ``batch_size / process_count`` rows and the global batch is assembled from
them; the step runs under ``jax.set_mesh``, so MoE layers use expert
parallelism on a mesh with an ``expert`` axis. Results do not depend on the
mesh (up to float summation order), and a checkpoint restores onto any mesh.
Multi-process runs (SLURM, TPU pods, ``JAX_COORDINATOR_ADDRESS``) start JAX's
distributed runtime first (:func:`dsjax.distributed.maybe_initialize`).

Host loop: after each step the loop reads back the metrics (loss and gradient
norm are checked every step: a NaN/Inf stops the run with
:class:`NonFiniteError` before anything of that step is saved), logs every
``log_every`` steps (console, ``metrics.jsonl``, TensorBoard) and saves a
checkpoint every ``checkpoint_every`` steps and at the last step. A logged
entry holds that step's own metrics, plus ``tokens_per_s`` (over the log
interval, compile time excluded) and ``loss_avg`` (mean loss over the steps
since the previous entry).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsjax import parallel as sharding_lib
from dsjax.parallel import distributed
from dsjax.data import default_data_config, make_dataset
from dsjax.model.config import make_config
from dsjax.model.transformer import frozen, init_params, param_shardings
from dsjax.train import checkpoint as checkpoint_lib
from dsjax.train import losses as losses_lib
from dsjax.train import metrics as metrics_lib
from dsjax.train import optim

__all__ = [
    "NonFiniteError",
    "TrainResult",
    "default_train_config",
    "validate_train_config",
    "model_config_from",
    "router_bias_paths",
    "update_router_biases",
    "init_train_state",
    "make_train_step",
    "train",
]

log = logging.getLogger(__name__)

ROUTER_BIAS = optim.ROUTER_BIAS_NAME


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm became NaN/Inf; the run stopped without saving that step."""


@dataclasses.dataclass
class TrainResult:
  step: int  # optimizer steps done (== num_steps unless nothing was left to do)
  state: dict  # {"params", "opt_state", "step"}
  metrics: dict  # the last step's metrics (host floats); {} if no step ran
  model_config: Any


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def default_train_config() -> ml_collections.ConfigDict:
  """Every key the loop reads, with its default.

  Keys:
    model: a preset name (str) or a ConfigDict of model fields (the default: all
      fields of ``tiny_v3``, so ``--config.model.FIELD=...`` works on the
      command line); the string "hf" reads the fields from ``init_from``'s
      HF ``config.json``.
    model_overrides: model fields set on top of ``model``.
    init_from: "" (random init), an HF checkpoint directory (``config.json`` +
      safetensors) or a dsjax workdir / step directory whose params start the
      run. Only used when the workdir has no checkpoint yet.
    seed: init, per-step rng and data order.
    num_steps: optimizer steps to reach (a resumed run continues up to it).
    batch_size: rows per optimizer step (split into
      ``optimizer.accumulation_steps`` micro-batches).
    seq_len: tokens per row.
    log_every: steps between console / metrics.jsonl / TensorBoard entries
      (the first step and the last are logged too).
    checkpoint_every: steps between checkpoints (the last step is saved too).
    keep_checkpoints: newest checkpoints kept (0: all).
    async_checkpointing: write checkpoints in a background thread.
    tensorboard: write TensorBoard event files to ``WORKDIR/tensorboard``.
    mtp_loss_weight: weight of the mean MTP cross-entropy (V3: 0.3, later 0.1).
    balance_loss_alpha: weight of the summed sequence-wise balance loss (1e-4).
    router_bias_update_rate: gamma of the aux-loss-free bias update (1e-3; 0 off).
    dsa: DeepSeek Sparse Attention training stages (V3.2 models; see
      :mod:`dsjax.train.dsa`):
      stage: "" (the model's own attention: top-k sparse with an indexer),
        "dense" (dense attention, indexer unused), "warmup" (dense attention,
        only the indexer trained, by KL to the attention distribution) or
        "sparse" (top-k attention, LM loss for the model, detached KL for
        the indexer);
      indexer_loss_weight: weight of ``indexer_kl`` in the loss;
      dense_pretrain_steps: for "warmup"/"sparse" runs that start from
        nothing (empty workdir, no ``init_from``): dense pre-training steps
        run first in ``WORKDIR/dense_pretrain`` so the attention the indexer
        learns from is not uniform (0: none).
    mesh: the device mesh (axes ``data``, ``fsdp``, ``expert``, ``tensor``;
      see :mod:`dsjax.parallel`): axis sizes, None for unset, -1 (at most
      one axis) for the remaining devices; ``preset`` names a preset
      ("fsdp", "fsdp_expert", "expert_tensor") whose sizes the other keys
      override. Unset axes are 1, except that ``data`` takes the remaining
      devices when no axis is -1. The default (nothing set) is plain data
      parallelism over every device (one device: as before), or over as many
      as a micro-batch splits evenly over (with a warning);
      ``--config.mesh.fsdp=-1 --config.mesh.expert=4``: experts split 4 ways,
      everything else FSDP-sharded over the rest; in a config file
      ``config.mesh.preset = "fsdp_expert"`` (a plain-dict config may hold a
      preset name or a dict of sizes). ``batch_size`` must divide by
      ``accumulation_steps`` times the batch shards (data x fsdp x expert).
    data: :func:`dsjax.data.default_data_config`.
    optimizer: :func:`dsjax.train.optim.default_optimizer_config`.
  """
  c = ml_collections.ConfigDict()
  c.model = make_config("tiny_v3")
  c.model_overrides = ml_collections.ConfigDict()
  c.init_from = ""
  c.seed = 0
  c.num_steps = 1000
  c.batch_size = 8
  c.seq_len = 256
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.tensorboard = True
  c.mtp_loss_weight = 0.3
  c.balance_loss_alpha = 1e-4
  c.router_bias_update_rate = 1e-3
  c.dsa = ml_collections.ConfigDict(dict(stage="", indexer_loss_weight=1.0, dense_pretrain_steps=0))
  c.mesh = ml_collections.ConfigDict(dict(preset="", **{axis: ml_collections.config_dict.placeholder(int)
                                                          for axis in sharding_lib.MESH_AXES}))
  c.data = default_data_config()
  c.optimizer = optim.default_optimizer_config()
  return c


def _get(config: Any, key: str) -> Any:
  try:
    return config[key]
  except (KeyError, AttributeError, TypeError):
    pass
  if hasattr(config, key):
    return getattr(config, key)
  return default_train_config()[key]


def validate_train_config(config: Any) -> None:
  """Raises ValueError naming the first bad top-level key."""

  def need(ok: bool, key: str, why: str):
    if not ok:
      raise ValueError(f"config.{key}={_get(config, key)!r}: {why}")

  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

  for key in ("num_steps", "batch_size", "seq_len", "log_every", "checkpoint_every"):
    need(is_int(_get(config, key)) and _get(config, key) >= (0 if key == "num_steps" else 1), key,
         "must be an integer >= " + ("0" if key == "num_steps" else "1"))
  need(is_int(_get(config, "seq_len")) and _get(config, "seq_len") >= 2, "seq_len", "must be >= 2")
  keep = _get(config, "keep_checkpoints")
  need(keep is None or (is_int(keep) and keep >= 0), "keep_checkpoints", "must be an integer >= 0 (0: keep all)")
  for key in ("mtp_loss_weight", "balance_loss_alpha", "router_bias_update_rate"):
    value = _get(config, key)
    need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
         key, "must be a finite number >= 0")
  dsa = _as_dict(_get(config, "dsa"))
  need(dsa.get("stage", "") in losses_lib.DSA_STAGES, "dsa",
       f"dsa.stage must be one of {losses_lib.DSA_STAGES}")
  need(isinstance(dsa.get("dense_pretrain_steps", 0), int) and dsa.get("dense_pretrain_steps", 0) >= 0, "dsa",
       "dsa.dense_pretrain_steps must be an integer >= 0")
  mesh = _get(config, "mesh")
  try:
    sharding_lib.mesh_sizes_from_config(mesh)
  except (ValueError, TypeError) as e:
    given = {k: v for k, v in _as_dict(mesh).items() if v not in (None, "")} if not isinstance(mesh, str) else mesh
    raise ValueError(f"config.mesh={given!r}: {e}") from None
  opt = optim.validate_optimizer_config(_get(config, "optimizer"))
  k = opt["accumulation_steps"]
  need(_get(config, "batch_size") % k == 0, "batch_size",
       f"must be divisible by optimizer.accumulation_steps={k} (micro-batches per step)")


def _as_dict(x: Any) -> dict:
  if x is None:
    return {}
  if isinstance(x, ml_collections.ConfigDict):
    return x.to_dict()
  return dict(x)


def model_config_from(config: Any) -> ml_collections.ConfigDict:
  """The model config a training config describes (``model`` + ``model_overrides``)."""
  model = _get(config, "model")
  overrides = _as_dict(_get(config, "model_overrides"))
  if isinstance(model, str) and model == "hf":
    from dsjax.hf.config import from_hf, read_hf_config  # pylint: disable=import-outside-toplevel
    path = _get(config, "init_from")
    if not path:
      raise ValueError('config.model="hf" reads the model from config.init_from, which is empty')
    return from_hf(read_hf_config(path), source=os.path.join(path, "config.json"), **overrides)
  if isinstance(model, str):
    return make_config(model, **overrides)
  return make_config(_as_dict(model), **overrides)


# --------------------------------------------------------------------------
# Router biases
# --------------------------------------------------------------------------


_names = optim._path_names  # one path-to-names helper for masks and bias lookup


def router_bias_paths(params: Any) -> dict[str, tuple[str, ...]]:
  """Top-level params key -> path of the one router bias inside that subtree.

  E.g. ``{"moe_layers": ("moe_layers", "mlp", "router", "e_score_correction_bias"),
  "mtp_0": ("mtp_0", "layer", "mlp", "router", "e_score_correction_bias")}``.
  These keys are the keys of the model's routing ``aux``.
  """
  found: dict[str, tuple[str, ...]] = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _names(path)
    if names and names[-1] == ROUTER_BIAS:
      if names[0] in found:
        raise ValueError(f"params[{names[0]!r}] holds more than one {ROUTER_BIAS}: "
                         f"{'/'.join(found[names[0]])} and {'/'.join(names)}")
      found[names[0]] = names
  return found


def update_router_biases(params: Any, loads: Mapping[str, jax.Array], rate: float) -> Any:
  """``b += rate * sign(mean(load) - load)`` for each router, per layer.

  Args:
    params: the parameter pytree (nested dicts).
    loads: aux key (top-level params key) -> tokens per expert, shaped like
      that router's bias (``[L, E]`` for a scanned stack, ``[E]`` otherwise);
      the mean is over experts (the last axis), separately for each layer.
    rate: the step size gamma. Every other leaf is returned as is.
  """
  if not loads or rate == 0:
    return params
  paths = router_bias_paths(params)
  targets = {}
  for key, load in loads.items():
    if key not in paths:
      raise ValueError(f"routing statistics for {key!r}, but params[{key!r}] has no {ROUTER_BIAS}")
    targets[paths[key]] = load

  def visit(path, leaf):
    load = targets.get(_names(path))
    if load is None:
      return leaf
    if load.shape != leaf.shape:
      raise ValueError(f"expert load {load.shape} does not match the router bias "
                       f"{'/'.join(_names(path))} {leaf.shape}")
    load = load.astype(jnp.float32)
    step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return (leaf.astype(jnp.float32) + rate * step).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(visit, params)


def _expert_loads(aux: Any) -> dict[str, jax.Array]:
  if not isinstance(aux, Mapping):
    return {}
  return {key: stats["expert_load"] for key, stats in aux.items()
          if isinstance(stats, Mapping) and "expert_load" in stats}


# --------------------------------------------------------------------------
# State and the jitted step
# --------------------------------------------------------------------------


def init_train_state(params: Any, tx: optax.GradientTransformation) -> dict:
  """``{"params", "opt_state", "step"}`` for given initial params."""
  return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def _step_key(seed: int) -> jax.Array:
  return jax.random.split(jax.random.key(int(seed)))[1]


def _init_key(seed: int) -> jax.Array:
  return jax.random.split(jax.random.key(int(seed)))[0]


def make_train_step(model_config: Any,
                    loss_fn: losses_lib.LossFn,
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
    model_config: the model config (frozen here for the loss function).
    loss_fn: ``(params, batch, model_config, rng) -> (loss, metrics, aux)``.
    tx: from :func:`dsjax.train.optim.make_optimizer` (built with
      ``accumulation_steps = 1``: accumulation happens here).
    seed: the run's seed; step s - 1 -> s uses ``fold_in(step_key, s - 1)``.
    accumulation_steps: micro-batches per step; every batch leaf's leading
      axis must divide by it.
    router_bias_update_rate: gamma of the router-bias update (0: off).
    schedule: learning-rate schedule, only to report ``lr``.
    trainable_mask: pytree of bools like params (True: counted in
      ``grad_norm``); None: all.
    jit: return the jitted step (state donated) or the plain function.
    mesh: run on this mesh (needs ``jit``). The step then takes this
      process's rows of the batch (host or device arrays) and assembles the
      global batch split over the batch axes
      (:func:`dsjax.parallel.place_batch`); it is jitted with explicit in/out
      shardings and runs under ``jax.set_mesh(mesh)``, so MoE layers use
      expert parallelism over the ``expert`` axis. Micro-batches stay split
      over the batch axes.
    state_shardings: a pytree like the state of ``NamedSharding``s on
      ``mesh`` (:func:`dsjax.parallel.state_shardings`); the state is kept in
      them. None: the shardings of the first state passed in.

  Returns:
    The step. Its metrics: the loss function's (mean over micro-batches),
    ``grad_norm``, ``lr`` (if ``schedule``), ``expert_load_max_over_mean``,
    ``expert_load_min_over_mean``; on a mesh with an ``expert`` axis of size
    P > 1 also ``expert_shard_load_max_over_mean``: per MoE layer, the token
    copies each expert shard (device group) receives, max over shards / mean,
    the largest over layers (what bounds the all-to-all and the expert
    matmuls of the busiest device).
  """
  static_config = None if model_config is None else frozen(model_config)
  k = int(accumulation_steps)
  rate = float(router_bias_update_rate)
  step_key = _step_key(seed)

  def grads_of(params, batch, rng):
    def wrapped(p):
      loss, metrics, aux = loss_fn(p, batch, static_config, rng)
      return loss, (metrics, _expert_loads(aux))

    (loss, (metrics, loads)), grads = jax.value_and_grad(wrapped, has_aux=True)(params)
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
    metrics.setdefault("loss", jnp.asarray(loss, jnp.float32))
    loads = {name: jax.lax.stop_gradient(value).astype(jnp.float32) for name, value in loads.items()}
    return grads, metrics, loads

  def step_fn(state, batch):
    params = state["params"]
    rng = jax.random.fold_in(step_key, state["step"])
    if k == 1:
      grads, metrics, loads = grads_of(params, batch, jax.random.fold_in(rng, 0))
    else:
      def split(x):
        x = jnp.asarray(x)
        if x.shape[0] % k:
          raise ValueError(f"batch leading axis {x.shape[0]} does not divide into {k} micro-batches")
        return x.reshape((k, x.shape[0] // k) + x.shape[1:])

      micro = jax.tree.map(split, batch)
      if mesh is not None:  # keep each micro-batch split over the batch axes (one cheap reshard of the inputs)
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, _micro_sharding(mesh, x.ndim)), micro)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(lambda b: grads_of(params, b, rng), first)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(carry, inputs):
        index, micro_batch = inputs
        out = grads_of(params, micro_batch, jax.random.fold_in(rng, index))
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
    new_params = optax.apply_updates(params, updates)
    new_params = update_router_biases(new_params, loads, rate)

    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    metrics.update(metrics_lib.expert_load_stats(loads))
    if mesh is not None and mesh.shape["expert"] > 1:
      metrics.update(_expert_shard_load_stats(loads, mesh.shape["expert"]))
    new_state = dict(params=new_params, opt_state=opt_state, step=state["step"] + 1)
    return new_state, metrics

  if mesh is None:
    return jax.jit(step_fn, donate_argnums=0) if jit else step_fn
  if not jit:
    raise ValueError("make_train_step(mesh=...) needs jit=True")
  return _MeshStep(step_fn, mesh, state_shardings)


def _micro_sharding(mesh, ndim: int) -> jax.sharding.NamedSharding:
  """[k, B / k, ...] micro-batches: the B / k rows split like a batch."""
  spec = sharding_lib.batch_sharding(mesh, max(ndim - 1, 1)).spec
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
    self._jitted = {}  # batch structure -> jitted step

  def __call__(self, state, batch):
    batch = sharding_lib.place_batch(batch, self.mesh)
    if self.state_shardings is None:
      self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
    state = jax.device_put(state, self.state_shardings)  # no copy where already in place
    key = (jax.tree.structure(batch), tuple(x.sharding for x in jax.tree.leaves(batch)))
    jitted = self._jitted.get(key)
    if jitted is None:
      jitted = self._jitted[key] = jax.jit(
          self._step_fn, donate_argnums=0,
          in_shardings=(self.state_shardings, jax.tree.map(lambda x: x.sharding, batch)),
          out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)))
    with jax.set_mesh(self.mesh):
      return jitted(state, batch)


# --------------------------------------------------------------------------
# Initial parameters
# --------------------------------------------------------------------------


def _sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, shardings: Any) -> Any:
  """``init_fn(rng)`` jitted straight into ``shardings`` (None: jitted, default placement).

  An ``init_fn`` that cannot be traced (reads files, uses numpy on its
  inputs) runs eagerly and is then placed leaf by leaf.
  """
  if shardings is None:
    return jax.jit(init_fn)(rng)
  mesh = jax.tree.leaves(shardings)[0].mesh
  try:
    with jax.set_mesh(mesh):
      return jax.jit(init_fn, out_shardings=shardings)(rng)
  except jax.errors.JAXTypeError:
    return jax.tree.map(sharding_lib.place, init_fn(rng), shardings)


def initial_params(config: Any, model_config, rng: jax.Array, *, shardings: Any = None) -> dict:
  """Random params, or the ones ``config.init_from`` points at (cast to the model's param dtypes).

  ``shardings``: a pytree like the params of ``NamedSharding``s: the params
  are created (random init) or placed (loaded leaves, as they are read) in
  these shards. None: default placement.

  ``init_from`` is anything :func:`dsjax.load` reads: an HF checkpoint
  directory (bf16/fp32 or block-FP8), a converted Orbax checkpoint, or a dsjax
  training run (workdir or step directory). Every loaded leaf must exist in
  the configured model with the same shape; only MTP modules may be missing
  from the source (e.g. HF checkpoints written by ``save_pretrained``): they
  start from random init.
  """
  source = _get(config, "init_from")
  random_init = lambda: _sharded_init(lambda key: init_params(model_config, key), rng, shardings)  # noqa: E731
  if not source:
    return random_init()
  if not os.path.exists(source):
    raise FileNotFoundError(f"config.init_from={source!r}: no such file or directory")
  from dsjax.api import load  # pylint: disable=import-outside-toplevel
  mesh = None if shardings is None else jax.tree.leaves(shardings)[0].mesh
  loaded = load(source, mesh=mesh).params
  abstract = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
  want = {_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  have = {_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  unknown = sorted(set(have) - set(want))
  if unknown:
    raise ValueError(f"config.init_from={source!r}: parameter {'/'.join(unknown[0])} is not part of the "
                     "configured model (check config.model)")
  missing = [p for p in want if p not in have]
  bad = [p for p in missing if not p[0].startswith("mtp_")]
  if bad:
    raise ValueError(f"config.init_from={source!r} lacks parameter {'/'.join(bad[0])}")
  for path, leaf in have.items():
    if tuple(leaf.shape) != tuple(want[path].shape):
      raise ValueError(f"config.init_from={source!r}: {'/'.join(path)} has shape {tuple(leaf.shape)}, "
                       f"the configured model wants {tuple(want[path].shape)}")
  if missing:
    log.warning("config.init_from=%r has no %s: those start from random init", source,
                sorted({p[0] for p in missing}))
  base = random_init() if missing else abstract
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(have[_names(path)], leaf.dtype) if _names(path) in have else leaf, base)
  return params if shardings is None else jax.device_put(params, shardings)


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def _config_mesh(mesh_config: Any, micro_batch: int) -> jax.sharding.Mesh:
  """The mesh ``config.mesh`` describes. Left unset on one process, it is data parallel over as many
  devices as a micro-batch splits evenly over (normally all of them; a warning says when fewer)."""
  sizes = sharding_lib.mesh_sizes_from_config(mesh_config)
  devices = jax.devices()
  if sizes == {"data": -1} and jax.process_count() == 1 and micro_batch % len(devices):
    used = max(d for d in range(1, len(devices) + 1) if micro_batch % d == 0)
    log.warning("config.mesh is unset: data parallel over %d of the %d devices (a micro-batch of %d rows does "
                "not split over all of them); set config.mesh to choose", used, len(devices), micro_batch)
    return sharding_lib.make_mesh({"data": used}, devices=devices[:used])
  return sharding_lib.make_mesh(sizes, devices)


def _config_json(config: Any) -> dict:
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  # Round-trip through JSON so that tuples etc. become what the saved file holds.
  return json.loads(json.dumps(as_dict, default=str))


def _batch_tokens(batch: Mapping[str, Any]) -> int:
  if "tokens" in batch:
    return int(np.prod(np.shape(batch["tokens"])))
  leaf = jax.tree.leaves(batch)[0]
  return int(np.prod(np.shape(leaf)[:2]))


def _next_or_none(iterator):
  try:
    return next(iterator)
  except StopIteration:
    return None


def train(config: Any,
          workdir: str,
          *,
          loss_fn: Optional[losses_lib.LossFn] = None,
          dataset: Optional[Iterable] = None,
          trainable: optim.Trainable = None,
          init_params_fn: Optional[Callable[[Any, jax.Array], Any]] = None,
          batch_hook: Optional[Callable[[int, dict], dict]] = None,
          print_fn: Optional[Callable[[str], None]] = print,
          mesh: Optional[jax.sharding.Mesh] = None) -> TrainResult:
  """Trains (or resumes training) up to ``config.num_steps`` optimizer steps.

  Args:
    config: training ConfigDict (:func:`default_train_config`).
    workdir: run directory: ``checkpoints/``, ``metrics.jsonl``,
      ``tensorboard/``, ``config.json``. If it holds a complete checkpoint the
      run resumes from the newest one (params, optimizer state, router biases,
      step, data-iterator state).
    loss_fn: ``(params, batch, model_config, rng) -> (loss, metrics, aux)``;
      default: pre-training loss with ``mtp_loss_weight`` /
      ``balance_loss_alpha`` from the config.
    dataset: iterable of batches (dicts of ``[batch_size, ...]`` arrays; with
      several processes, each process's iterable yields its own
      ``batch_size / process_count`` rows); default:
      :func:`dsjax.data.make_dataset` on ``config.data`` (per process). Its iterator
      state is checkpointed when it is a grain iterator.
    trainable: which leaves the optimizer may update (see
      :func:`dsjax.train.optim.trainable_mask`); router biases never are.
    init_params_fn: ``(model_config, rng) -> params`` for a fresh run;
      default: :func:`initial_params` (random or ``config.init_from``).
    batch_hook: ``(step, batch) -> batch`` applied to the host batch of step
      ``step`` (1-based) before it is used (testing, data surgery).
    print_fn: console output (one progress line per logged step).
    mesh: a ``jax.sharding.Mesh`` with the axes of :mod:`dsjax.parallel`
      to run on instead of the one ``config.mesh`` describes (e.g. a mesh over
      a subset of the devices).

  Raises:
    NonFiniteError: a NaN/Inf loss or gradient norm (naming the step and the
      quantity); the state of that step is not saved, earlier checkpoints stay.
  """
  distributed.maybe_initialize()  # before anything touches a device
  validate_train_config(config)
  model_config = model_config_from(config)
  if model_config.param_dtype != "float32":
    log.warning("model.param_dtype=%r: master weights and Adam moments are kept in it; float32 is "
                "the recommended training setting", model_config.param_dtype)
  seed = int(_get(config, "seed"))
  num_steps = int(_get(config, "num_steps"))
  batch_size = int(_get(config, "batch_size"))
  seq_len = int(_get(config, "seq_len"))
  log_every = int(_get(config, "log_every"))
  checkpoint_every = int(_get(config, "checkpoint_every"))
  keep = _get(config, "keep_checkpoints") or None
  opt_cfg = ml_collections.ConfigDict(optim.validate_optimizer_config(_get(config, "optimizer")))
  accumulation_steps = opt_cfg.accumulation_steps
  opt_cfg.accumulation_steps = 1  # the train step accumulates itself
  primary = jax.process_index() == 0
  if mesh is None:
    mesh = _config_mesh(_get(config, "mesh"), batch_size // accumulation_steps)
  shards = sharding_lib.batch_shards(mesh)
  if batch_size % (accumulation_steps * shards):
    raise ValueError(f"config.batch_size={batch_size}: must be divisible by optimizer.accumulation_steps="
                     f"{accumulation_steps} x the mesh's batch shards (data x fsdp x expert = {shards}), so that "
                     f"every micro-batch splits evenly over the devices (mesh {dict(mesh.shape)})")
  if shards % jax.process_count():
    raise ValueError(f"config.mesh: the batch is split {shards} ways, which does not divide among "
                     f"{jax.process_count()} processes; put process-spanning devices on data/fsdp/expert "
                     f"(mesh {dict(mesh.shape)})")

  dsa = _as_dict(_get(config, "dsa"))
  dsa_stage = dsa.get("stage", "")
  if dsa_stage in ("warmup", "sparse") and not model_config.use_indexer:
    raise ValueError(f"config.dsa.stage={dsa_stage!r} needs a model with an indexer (model.use_indexer=True, "
                     "e.g. a V3.2 preset)")
  if loss_fn is None:
    loss_fn = losses_lib.make_pretraining_loss(_get(config, "mtp_loss_weight"),
                                               _get(config, "balance_loss_alpha"), dsa_stage=dsa_stage,
                                               indexer_loss_weight=dsa.get("indexer_loss_weight", 1.0))
  if trainable is None and dsa_stage == "warmup":
    trainable = optim.indexer_only
  if dataset is None:
    # Each process reads its own documents and rows; the step assembles the global batch.
    dataset = make_dataset(_get(config, "data"), seq_len=seq_len, batch_size=batch_size // jax.process_count(),
                           seed=seed, process_index=jax.process_index(), process_count=jax.process_count())
  iterator = iter(dataset)
  checkpointable_data = hasattr(iterator, "get_state") and hasattr(iterator, "set_state")

  os.makedirs(workdir, exist_ok=True)
  init_fn = init_params if init_params_fn is None else init_params_fn
  abstract_params = jax.eval_shape(lambda: init_fn(model_config, _init_key(seed)))
  tx = optim.make_optimizer(opt_cfg, abstract_params, trainable)
  mask = optim.trainable_mask(abstract_params, trainable)
  params_shardings = param_shardings(model_config, mesh, like=abstract_params)
  abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)
  state_shardings = sharding_lib.state_shardings(abstract_state, params_shardings, mesh)
  if init_params_fn is None:
    make_params = lambda mc, rng: initial_params(config, mc, rng, shardings=params_shardings)  # noqa: E731
  else:
    make_params = lambda mc, rng: _sharded_init(lambda key: init_params_fn(mc, key), rng,  # noqa: E731
                                                params_shardings)
  config_json = _config_json(config)

  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=keep,
                                             async_save=bool(_get(config, "async_checkpointing")))
  writer = None
  try:
    start_step = checkpointer.latest_step()
    if start_step is not None:
      # Restored straight into this run's shardings, whatever mesh wrote the checkpoint.
      target = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                            abstract_state, state_shardings)
      state = checkpointer.restore(start_step, target,
                                   data_iterator=iterator if checkpointable_data else None)
      start_step = int(state["step"])
      resumed = True
    else:
      state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_shardings)(
          make_params(model_config, _init_key(seed)))
      start_step = 0
      resumed = False
      if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
          json.dump(config_json, f, indent=2)

    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step,
                                       tensorboard=bool(_get(config, "tensorboard")),
                                       print_fn=print_fn if primary else None, primary=primary)
    if resumed:
      writer.message(f"Resuming from step {start_step} ({checkpointer.step_dir(start_step)})"
                     + ("" if checkpointable_data else "; the data iterator has no state: it restarts"))
    if start_step >= num_steps:
      writer.message(f"Nothing to do: step {start_step} >= num_steps={num_steps}")
      return TrainResult(start_step, state, {}, model_config)

    train_step = make_train_step(model_config, loss_fn, tx, seed=seed, accumulation_steps=accumulation_steps,
                                 # The warm-up freezes everything but the indexers, router biases too.
                                 router_bias_update_rate=0.0 if dsa_stage == "warmup"
                                 else _get(config, "router_bias_update_rate"),
                                 schedule=optim.make_schedule(opt_cfg), trainable_mask=mask, mesh=mesh,
                                 state_shardings=state_shardings)
    throughput = metrics_lib.Throughput(num_steps)
    last_saved = checkpointer.latest_step()
    step = start_step
    host_metrics: dict = {}
    interval_losses: list[float] = []  # since the previous log line
    batch = _next_or_none(iterator)
    while step < num_steps:
      if batch is None:
        writer.message(f"The data ran out after step {step} (data.num_epochs); stopping there.")
        if last_saved != step:
          checkpointer.save(step, state, data_iterator=iterator if checkpointable_data else None,
                            config=config_json, force=True)
        break
      if batch_hook is not None:
        batch = batch_hook(step + 1, batch)
      tokens = _batch_tokens(batch) * jax.process_count()  # every process reads as many rows
      state, metrics = train_step(state, batch)
      step += 1
      save_now = step % checkpoint_every == 0 or step == num_steps
      next_batch = None
      if not save_now:
        next_batch = _next_or_none(iterator)  # overlaps with the step running on the device
      host_metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
      bad = [name for name in ("loss", "grad_norm")
             if name in host_metrics and not math.isfinite(host_metrics[name])]
      if bad:
        where = (f"the last good checkpoint is step {last_saved} ({checkpointer.step_dir(last_saved)})"
                 if last_saved is not None else "no checkpoint was saved")
        values = ", ".join(f"{name}={host_metrics.get(name)}" for name in ("loss", "grad_norm"))
        raise NonFiniteError(f"Non-finite {' and '.join(bad)} at step {step} ({values}); stopping "
                             f"without saving this step's state: {where}.")
      throughput.step_done(step, tokens)
      interval_losses.append(host_metrics.get("loss", float("nan")))
      if step % log_every == 0 or step == num_steps or step == 1:
        tokens_per_s, eta = throughput.log(step)
        host_metrics["tokens_per_s"] = tokens_per_s
        host_metrics["loss_avg"] = float(np.mean(interval_losses))
        interval_losses = []
        writer.write(step, host_metrics, line=metrics_lib.format_progress(step, num_steps, host_metrics, eta))
      if save_now:
        saved = checkpointer.save(step, state, data_iterator=iterator if checkpointable_data else None,
                                  config=config_json)
        if saved:
          last_saved = step
        if step < num_steps:
          next_batch = _next_or_none(iterator)
      batch = next_batch
    checkpointer.wait()
    writer.message(f"Done: step {step}; checkpoints in {checkpointer.directory}")
    return TrainResult(step, state, host_metrics, model_config)
  finally:
    if writer is not None:
      writer.close()
    checkpointer.close()
