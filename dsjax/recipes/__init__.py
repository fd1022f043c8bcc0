"""Recipes: what a training run trains, on what data, with which frozen trees. Each one is a
:class:`Recipe` for the one loop (:func:`dsjax.train.loop.train`), chosen by ``config.recipe``:

    "pretrain"  LM + MTP + balance loss on packed documents (`dsjax.recipes.pretrain`)
    "dsa"       a DeepSeek Sparse Attention stage, warm-up or sparse (`dsjax.recipes.dsa`)
    "sft"       supervised fine-tuning on prompt rows' completions (`dsjax.recipes.sft`)
    "grpo"      GRPO (V3.2's objective, keep routing, keep sampling mask; `dsjax.recipes.grpo`)

    result = dsjax.recipes.run(config, workdir)

A recipe module has ``recipe(config) -> Recipe`` and ``run(config, workdir, **kwargs)``; the
latter is what :func:`run` dispatches to (most are ``train(config, workdir, recipe(config),
**kwargs)``; the DSA one may pre-train densely first). :func:`register` adds one.
"""

from __future__ import annotations

from typing import Any, Callable

from dsjax.recipes import dsa, grpo, pretrain, sft
from dsjax.train.config import get
from dsjax.train.loop import TrainResult
from dsjax.train.recipe import Batches, LossFn, Recipe, from_iterable

__all__ = ["RECIPES", "Recipe", "Batches", "LossFn", "from_iterable", "register", "run"]

# config.recipe -> run(config, workdir, **kwargs) -> TrainResult
RECIPES: dict[str, Callable[..., TrainResult]] = {"pretrain": pretrain.run, "dsa": dsa.run, "sft": sft.run,
                                                  "grpo": grpo.run}


def register(name: str, run_fn: Callable[..., TrainResult]) -> None:
    """Makes ``config.recipe = name`` run ``run_fn(config, workdir, **kwargs)``."""
    RECIPES[name] = run_fn


def run(config: Any, workdir: str, **kwargs) -> TrainResult:
    """Trains (or resumes) ``config`` in ``workdir`` with the recipe ``config.recipe`` names.

    ``kwargs`` go to :func:`dsjax.train.loop.train` (``print_fn``, ``mesh``).
    """
    name = get(config, "recipe")
    if name not in RECIPES:
        raise ValueError(f"config.recipe={name!r}: must be one of {sorted(RECIPES)}")
    return RECIPES[name](config, workdir, **kwargs)
