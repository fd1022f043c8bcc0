"""Query chunking: evaluate a per-query function over [B, T, ...] arrays a few queries at a time.

The memory-lean references (and the TPU-style wrappers, whose prefetched indices must fit SMEM)
split their inputs along T into chunks of c queries, `jax.lax.map` a function over the chunks
and stitch its outputs back along T. This module is the one place that does so:

- `split_chunks(x, chunk, fill)`: [B, T, ...] -> [n, B, c, ...], the last chunk padded with fill.
- `join_chunks(y, length)`: the inverse, [n, B, c, ...] -> [B, length, ...] (padding dropped).
- `map_query_chunks(fn, arrays, fills, chunk)`: both around a `jax.lax.map` of fn.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import einops
import jax

from dsjax.kernels import _backend as be


def split_chunks(x: jax.Array, chunk: int, fill=0) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...] with n = ceil(T / chunk); the last chunk is padded
    with `fill` (choose one the function treats as empty, e.g. -1 for an index)."""
    x = be.pad_axis(x, 1, be.cdiv(x.shape[1], chunk) * chunk, fill)
    return einops.rearrange(x, "b (n c) ... -> n b c ...", c=chunk)


def join_chunks(y: Any, length: int) -> Any:
    """Inverse of `split_chunks` for every leaf of the pytree y ([n, B, c, ...] leaves):
    [B, length, ...], the padded tail dropped."""
    return jax.tree.map(lambda leaf: einops.rearrange(leaf, "n b c ... -> b (n c) ...")[:, :length], y)


def map_query_chunks(fn: Callable[..., Any], arrays: Sequence[jax.Array], fills: Sequence[Any], chunk: int, *,
                     checkpoint: bool = False, exact: bool = False) -> Any:
    """fn(*arrays) evaluated `chunk` queries at a time, with outputs re-joined along T.

    Args:
      fn: maps chunks [B, c, ...] of `arrays` (in order) to a pytree of [B, c, ...] arrays; it
        must treat queries independently (the result is then the same as fn(*arrays)).
      arrays: [B, T, ...] arrays, all with the same B and T. fills: one pad value per array,
        used for the queries past T in the last chunk (their outputs are dropped).
      chunk: queries per call. When it covers T, fn is called once on the whole arrays, with
        no padding and no loop (unless `exact`).
      checkpoint: run fn under `jax.checkpoint`, so that autodiff keeps one chunk's
        intermediates alive at a time, not all of them.
      exact: every call gets exactly `chunk` queries, padded ones included, even when one
        chunk covers T (for kernels whose grid is fixed by the chunk).

    Returns fn's pytree of outputs with [B, T, ...] leaves.
    """
    if len(arrays) != len(fills):
        raise ValueError(f"one fill per array: {len(arrays)} arrays, {len(fills)} fills")
    if checkpoint:
        fn = jax.checkpoint(fn)
    length = arrays[0].shape[1]
    if chunk >= length and not exact:
        return fn(*arrays)
    stacked = tuple(split_chunks(x, chunk, fill) for x, fill in zip(arrays, fills))
    return join_chunks(jax.lax.map(lambda a: fn(*a), stacked), length)
