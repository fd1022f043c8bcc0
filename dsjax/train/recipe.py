"""What a recipe gives the training loop (:func:`dsjax.train.loop.train`).

A recipe is everything that differs between pre-training, a DSA stage, SFT, GRPO or
distillation; the loop, the jitted step, checkpoints and logging are shared:

    Recipe(loss=...,                   # (params, frozen, batch, rng) -> (loss, metrics, aux), pure
           batches=...,                # (config, process_index, process_count) -> Batches
           frozen=None,                # (initial params) -> {name: params-like tree}, never trained
           trainable=None,             # which leaves the optimizer updates (dsjax.train.optim.Trainable)
           update_router_biases=True,  # aux-loss-free balancing on (needs the loss's aux)
           init_params=None)           # (model config, rng) -> params; None: the model, random or init_from

The loss:

* ``params``: the trained tree (differentiated);
* ``frozen``: ``{name: tree}`` from ``Recipe.frozen`` ({} without), e.g. a reference policy or a
  teacher; an explicit, sharded argument of the jitted step (never a constant baked into it);
* ``batch``: one micro-batch, a dict of arrays with a leading batch axis;
* ``rng``: a key per micro-batch (``fold_in(step key, micro-batch index)``);
* returns a float32 scalar loss, a dict of scalars to log (micro-batch means) and the model's
  routing ``aux`` (``ModelOutput.aux``: the step reads ``aux[key]["expert_load"]`` to move that
  router's bias; ``{}`` when no router bias should move).

The batches: ``next(state)`` returns this process's rows of the next step's batch (``batch_size
/ process_count`` rows; host or device arrays) or None when the data ran out. ``state`` is the
current train state (``{"params", "opt_state", "step", "frozen"}``; ``state["step"]`` steps are
done), so on-policy data (rollouts of the current params) is built right there; off-policy data
ignores it, and then reading the next batch overlaps with the step running on the devices. Use
``state`` within ``next`` only (the loop donates it to the next step). Entries named
``metrics/<name>`` (host floats the batches computed, e.g. rewards or timings) do not reach the
step: the loop logs them as ``<name>`` with the metrics of the step that trains on the batch. Optional ``get_state()``
(JSON-serialisable) and ``set_state(state)`` let checkpoints hold the data position, so a resumed
run reads exactly the batches an uninterrupted one would.

The frozen trees are built once, at a fresh start, from the initial params; they are kept in the
train state (checkpointed, restored, on any mesh) and sharded like the model's params
(``dsjax.model.param_shardings(model_config, mesh, like=tree)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Protocol

import jax

from dsjax.train.optim import Trainable

__all__ = ["HOST_METRICS_PREFIX", "LossFn", "Batches", "Recipe", "from_iterable"]

HOST_METRICS_PREFIX = "metrics/"  # batch entries the loop logs instead of passing them to the step

LossFn = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, dict, dict]]


class Batches(Protocol):
    def next(self, state: dict) -> Optional[dict]:
        """This process's rows of the next batch, or None when there is no more data."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """See the module docstring."""

    loss: LossFn
    batches: Callable[[Any, int, int], Batches]
    frozen: Optional[Callable[[Any], dict]] = None
    trainable: Trainable = None
    update_router_biases: bool = True
    init_params: Optional[Callable[[Any, jax.Array], Any]] = None


class _Iterated:
    """Batches read from an iterator, whatever the train state."""

    def __init__(self, iterator):
        self.iterator = iterator

    def next(self, state: dict) -> Optional[dict]:
        del state
        return next(self.iterator, None)


class _CheckpointedIterated(_Iterated):
    """The same, for an iterator with a position (a grain iterator): checkpointed with the state."""

    def get_state(self) -> Any:
        return self.iterator.get_state()

    def set_state(self, state: Any) -> None:
        self.iterator.set_state(state)


def from_iterable(iterable: Iterable[dict]) -> Batches:
    """Off-policy batches from any iterable of batch dicts (a grain dataset, a list, a generator);
    the data position is checkpointed when the iterator has ``get_state``/``set_state``."""
    iterator = iter(iterable)
    if hasattr(iterator, "get_state") and hasattr(iterator, "set_state"):
        return _CheckpointedIterated(iterator)
    return _Iterated(iterator)
