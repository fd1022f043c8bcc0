"""Run a batch-independent custom call (a Pallas kernel) on each device's rows of the batch.

A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split: on a mesh XLA would
all-gather its operands and run the whole batch on every device. Kernels that treat batch rows
independently are wrapped with `per_batch_shard`: under an active mesh (`jax.set_mesh`, Auto axes,
more than one device) the call runs inside `jax.shard_map`, the batch dim split over the batch axes
that divide it and every other dim replicated. Otherwise the kernel is called as it is.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec

from dsjax.parallel.mesh import BATCH_AXES, multi_device_auto_mesh


def batch_axes_dividing(mesh, batch: int) -> tuple[str, ...]:
    """The batch axes of `mesh` (in `BATCH_AXES` order) whose sizes, multiplied, divide `batch`."""
    sizes = dict(mesh.shape)
    axes, shards = [], 1
    for axis in BATCH_AXES:
        size = sizes.get(axis, 1)
        if size > 1 and batch % (shards * size) == 0:
            axes.append(axis)
            shards *= size
    return tuple(axes)


def per_batch_shard(kernel):
    """`kernel` run per batch shard under a multi-device mesh (see the module doc).

    Array operands, positional or keyword, have the batch first or are scalars (replicated, e.g. a
    query offset); other keyword arguments are static options; outputs have the batch first.
    """
    @functools.wraps(kernel)
    def run(*operands, **kwargs):
        mesh = multi_device_auto_mesh()
        batch_axes = () if mesh is None else batch_axes_dividing(mesh, operands[0].shape[0])
        if not batch_axes:
            return kernel(*operands, **kwargs)
        keyword_operands = {name: value for name, value in kwargs.items() if isinstance(value, (jax.Array, np.ndarray))}
        options = {name: value for name, value in kwargs.items() if name not in keyword_operands}
        batch_spec = PartitionSpec(batch_axes)
        in_specs = jax.tree.map(lambda x: batch_spec if np.ndim(x) else PartitionSpec(), (operands, keyword_operands))
        # check_vma=False: interpret-mode pallas_calls carry no varying-manual-axes annotations.
        per_shard = jax.shard_map(lambda args, keyword_args: kernel(*args, **keyword_args, **options), mesh=mesh,
                                  in_specs=in_specs, out_specs=batch_spec, check_vma=False)
        return per_shard(operands, keyword_operands)

    return run
