"""A fresh run's parameters: random (created in their shards) or read from ``config.init_from``."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dsjax import parallel
from dsjax.convert.load import read_checkpoint
from dsjax.model import abstract_params, init_params
from dsjax.train.config import get
from dsjax.tree import named_leaves

__all__ = ["sharded_init", "initial_params"]

log = logging.getLogger(__name__)


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, shardings: Any) -> Any:
    """``init_fn(rng)`` jitted straight into ``shardings`` (None: jitted, default placement).

    An ``init_fn`` that cannot be traced (reads files, uses numpy on its inputs) runs eagerly and
    is then placed leaf by leaf.
    """
    if shardings is None:
        return jax.jit(init_fn)(rng)
    mesh = jax.tree.leaves(shardings)[0].mesh
    try:
        with jax.set_mesh(mesh):
            return jax.jit(init_fn, out_shardings=shardings)(rng)
    except jax.errors.JAXTypeError:
        return jax.tree.map(parallel.place, init_fn(rng), shardings)


def initial_params(config: Any, model_config, rng: jax.Array, *, shardings: Any = None,
                   init_fn: Callable[[Any, jax.Array], Any] | None = None) -> dict:
    """Random params, or the ones ``config.init_from`` points at (cast to the model's param dtypes);
    with ``init_fn`` (a recipe's ``init_params``), ``init_fn(model_config, rng)`` instead.

    ``shardings``: a pytree like the params of ``NamedSharding``s: the params are created (random
    init) or placed (loaded leaves, as they are read) in these shards. None: default placement.

    ``init_from`` is anything :func:`dsjax.convert.load.read_checkpoint` reads: an HF checkpoint
    directory (bf16/fp32 or block-FP8), a converted Orbax checkpoint, or a dsjax training run
    (workdir or step directory). Every loaded leaf must exist in the configured model with the
    same shape; only MTP modules may be missing from the source (e.g. HF checkpoints written by
    ``save_pretrained``): they start from random init.
    """
    if init_fn is not None:
        return sharded_init(lambda key: init_fn(model_config, key), rng, shardings)
    source = get(config, "init_from")
    random_init = lambda: sharded_init(lambda key: init_params(model_config, key), rng, shardings)  # noqa: E731
    if not source:
        return random_init()
    if not os.path.exists(source):
        raise FileNotFoundError(f"config.init_from={source!r}: no such file or directory")
    mesh = None if shardings is None else jax.tree.leaves(shardings)[0].mesh
    have = named_leaves(read_checkpoint(source, mesh)[1])
    abstract = abstract_params(model_config)
    want = named_leaves(abstract)
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise ValueError(f"config.init_from={source!r}: parameter {'/'.join(unknown[0])} is not part of the "
                         "configured model (check config.model)")
    missing = [path for path in want if path not in have]
    bad = [path for path in missing if not path[0].startswith("mtp_")]
    if bad:
        raise ValueError(f"config.init_from={source!r} lacks parameter {'/'.join(bad[0])}")
    for path, leaf in have.items():
        if tuple(leaf.shape) != tuple(want[path].shape):
            raise ValueError(f"config.init_from={source!r}: {'/'.join(path)} has shape {tuple(leaf.shape)}, "
                             f"the configured model wants {tuple(want[path].shape)}")
    if missing:
        log.warning("config.init_from=%r has no %s: those start from random init", source,
                    sorted({path[0] for path in missing}))
    base = named_leaves(random_init() if missing else abstract)
    params = jax.tree_util.tree_unflatten(
        jax.tree.structure(abstract),
        [jnp.asarray(have[path], want[path].dtype) if path in have else base[path] for path in want])
    return params if shardings is None else jax.device_put(params, shardings)
