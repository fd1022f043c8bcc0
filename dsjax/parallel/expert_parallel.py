"""Expert parallelism: routed experts split over the `expert` mesh axis, tokens sent to them.

Inside `shard_map`, each device holds its own tokens and E / P experts (P = expert axis size):

    1. sort its token copies by destination device and pack them into a [P, C, D] send buffer;
    2. `all_to_all` over `expert`: each device receives the copies meant for its experts;
    3. grouped matmuls (`jax.lax.ragged_dot`) over its local experts (a zero "expert" absorbs padding);
    4. `all_to_all` back, then each token sums its k weighted results.

C is the per-destination capacity. Dropless (`expert_capacity_factor = 0`) uses the worst case,
C = tokens x k, so nothing is ever dropped; a capacity factor f uses C = ceil(f x tokens x k / P) and
drops the copies beyond it (counted in the aux metrics). `lax.all_to_all` needs equal-size chunks,
which is what XLA:CPU supports; `ragged_all_to_all` (GPU/TPU) would send exact sizes instead.
With a `tensor` axis, the expert MLP width is split too and the down projection is summed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.parallel.mesh import BATCH_AXES


def capacity(tokens: int, top_k: int, num_shards: int, capacity_factor: float) -> int:
    if capacity_factor <= 0:
        return tokens * top_k
    return max(1, min(tokens * top_k, math.ceil(capacity_factor * tokens * top_k / num_shards)))


def _local_experts(x, indices, weights, gate, up, down, *, capacity_factor):
    num_shards = jax.lax.axis_size("expert")
    tokens, top_k = indices.shape
    local_experts = gate.shape[0]
    cap = capacity(tokens, top_k, num_shards, capacity_factor)

    flat = indices.reshape(-1)
    dest = flat // local_experts
    order = jnp.argsort(dest, stable=True)
    dest_sorted = dest[order]
    counts = jnp.bincount(dest, length=num_shards)
    slot = jnp.arange(flat.size) - (jnp.cumsum(counts) - counts)[dest_sorted]
    kept = slot < cap
    slot = jnp.where(kept, slot, cap)  # out of range: dropped by mode="drop"

    send_x = jnp.zeros((num_shards, cap, x.shape[-1]), x.dtype).at[dest_sorted, slot].set(x[order // top_k], mode="drop")
    send_e = jnp.full((num_shards, cap), local_experts, jnp.int32).at[dest_sorted, slot].set(
        (flat % local_experts)[order], mode="drop")
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0)

    rows, row_experts = recv_x.reshape(-1, x.shape[-1]), recv_e.reshape(-1)
    by_expert = jnp.argsort(row_experts, stable=True)
    group_sizes = jnp.bincount(row_experts, length=local_experts + 1).astype(jnp.int32)
    pad = lambda w: jnp.concatenate([w, jnp.zeros((1, *w.shape[1:]), w.dtype)])  # noqa: E731
    grouped = rows[by_expert]
    hidden = jax.nn.silu(jax.lax.ragged_dot(grouped, pad(gate), group_sizes)) * jax.lax.ragged_dot(grouped, pad(up), group_sizes)
    out = jax.lax.ragged_dot(hidden, pad(down), group_sizes)
    out = jax.lax.psum(out, "tensor")  # the MLP width may be split over `tensor`
    out = jnp.zeros_like(out).at[by_expert].set(out).reshape(num_shards, cap, -1)
    back = jax.lax.all_to_all(out, "expert", 0, 0)

    results = jnp.where(kept[:, None], back.at[dest_sorted, slot].get(mode="fill", fill_value=0), 0)
    per_copy = jnp.zeros((flat.size, x.shape[-1]), back.dtype).at[order].set(results)
    combined = jnp.einsum("nkd,nk->nd", per_copy.reshape(tokens, top_k, -1), weights.astype(per_copy.dtype))
    dropped = jnp.sum(~kept).astype(jnp.float32)
    return combined, jax.lax.psum(dropped, BATCH_AXES)[None]


def routed_experts_expert_parallel(x, routing, gate, up, down, *, mesh, capacity_factor: float = 0.0):
    """x [N, D] tokens (N split over the batch axes) -> [N, D]; plus dropped token copies."""
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    if batch and x.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = None  # too few tokens to split: every device routes all of them (correct, redundant)
    fn = jax.shard_map(
        lambda *args: _local_experts(*args, capacity_factor=capacity_factor),
        mesh=mesh,
        in_specs=(P(batch, None), P(batch, None), P(batch, None), P("expert", None, "tensor"),
                  P("expert", None, "tensor"), P("expert", "tensor", None)),
        out_specs=(P(batch, None), P(None)),
        check_vma=False,
    )
    out, dropped = fn(x, routing.indices, routing.weights, gate, up, down)
    return out, dropped[0]
