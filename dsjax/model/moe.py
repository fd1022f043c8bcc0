"""DeepSeekMoE: shared experts plus group-limited top-k routed experts, and the dense SwiGLU MLP.

    y = sum_k w_k expert_k(x) + shared(x)          (router and weights w: `dsjax.model.router`)

Routed experts run dropless: token copies are sorted by expert and multiplied group by group
with `jax.lax.ragged_dot`, so each token costs k experts' FLOPs, not all of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.params import Kernel, Linear
from dsjax.model.router import Router, Routing, expert_load, sequence_balance_loss
from dsjax.parallel.expert_parallel import routed_experts_expert_parallel
from dsjax.parallel.mesh import active_mesh


class MLP(nn.Module):
    """SwiGLU: down(silu(x W_gate) * (x W_up))."""

    intermediate_size: int
    config: object

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.initializer_range)
        gate = Linear((self.intermediate_size,), ("embed", "mlp"), name="gate_proj", **common)(x)
        up = Linear((self.intermediate_size,), ("embed", "mlp"), name="up_proj", **common)(x)
        return Linear((c.hidden_size,), ("mlp", "embed"), name="down_proj", **common)(nn.silu(gate) * up)


class RoutedExperts(nn.Module):
    """All routed experts' SwiGLU weights, stacked on a leading `expert` axis."""

    config: object

    @nn.compact
    def __call__(self, tokens: jax.Array, routing: Routing) -> jax.Array:
        c = self.config
        dim, hidden = c.hidden_size, c.moe_intermediate_size
        common = dict(init_std=c.initializer_range, param_dtype=c.param_dtype)
        gate = Kernel((c.num_routed_experts, dim, hidden), ("expert", "embed", "mlp"), name="gate_proj", **common)()
        up = Kernel((c.num_routed_experts, dim, hidden), ("expert", "embed", "mlp"), name="up_proj", **common)()
        down = Kernel((c.num_routed_experts, hidden, dim), ("expert", "mlp", "embed"), name="down_proj", **common)()
        if tokens.shape[0] * routing.indices.shape[1] < c.num_routed_experts:
            return routed_experts_gathered(tokens, routing, gate, up, down)  # decode: a few tokens
        gate, up, down = (w.astype(c.dtype) for w in (gate, up, down))
        mesh = active_mesh()
        if mesh is not None and mesh.shape.get("expert", 1) > 1 and c.moe_impl == "ragged":
            out, dropped = routed_experts_expert_parallel(tokens, routing, gate, up, down, mesh=mesh,
                                                          capacity_factor=c.expert_capacity_factor)
            self.sow("intermediates", "dropped_copies", dropped)
            return out
        compute = routed_experts_ragged if c.moe_impl == "ragged" else routed_experts_dense
        return compute(tokens, routing, gate, up, down)


def routed_experts_ragged(x, routing: Routing, gate, up, down):
    """Dropless expert compute: sort token copies by expert, grouped matmuls, unsort, combine."""
    num_tokens, top_k = routing.indices.shape
    flat_experts = routing.indices.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=gate.shape[0]).astype(jnp.int32)
    x_sorted = x[order // top_k]  # [N k, D]
    hidden = nn.silu(jax.lax.ragged_dot(x_sorted, gate, group_sizes)) * jax.lax.ragged_dot(x_sorted, up, group_sizes)
    y_sorted = jax.lax.ragged_dot(hidden, down, group_sizes)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(num_tokens, top_k, -1)
    return jnp.einsum("nkd,nk->nd", y, routing.weights.astype(y.dtype))


def routed_experts_gathered(x, routing: Routing, gate, up, down):
    """Each token through its own k experts, their weights gathered: for a few tokens (decode steps),
    where reading k experts per token instead of all of them is what makes the step cheap."""
    gate, up, down = (w[routing.indices].astype(x.dtype) for w in (gate, up, down))  # [N, k, ...]
    hidden = nn.silu(jnp.einsum("nd,nkdf->nkf", x, gate)) * jnp.einsum("nd,nkdf->nkf", x, up)
    routed = jnp.einsum("nkf,nkfd->nkd", hidden, down)
    return jnp.einsum("nkd,nk->nd", routed, routing.weights.astype(routed.dtype))


def routed_experts_dense(x, routing: Routing, gate, up, down):
    """Every expert on every token, weighted by a dense [N, E] combine matrix (reference/tests)."""
    combine = jnp.zeros((x.shape[0], gate.shape[0]), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], routing.indices].add(routing.weights)
    hidden = nn.silu(jnp.einsum("nd,edf->nef", x, gate)) * jnp.einsum("nd,edf->nef", x, up)
    return jnp.einsum("nef,efd,ne->nd", hidden, down, combine.astype(x.dtype))


class MoE(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, forced_indices: jax.Array | None = None):
        """x [B, T, D], valid [B, T] -> (y [B, T, D], aux dict of per-layer routing statistics)."""
        c = self.config
        batch, length, dim = x.shape
        tokens = x.reshape(-1, dim)
        router = Router(c, name="router")
        routing = router(tokens, None if forced_indices is None else forced_indices.reshape(-1, c.num_experts_per_token))
        routed = RoutedExperts(c, name="experts")(tokens.astype(c.dtype), routing)
        y = routed.reshape(batch, length, dim)
        if c.num_shared_experts:
            y = y + MLP(c.moe_intermediate_size * c.num_shared_experts, c, name="shared_experts")(x)
        flat_valid = valid.reshape(-1)
        aux = dict(
            expert_load=expert_load(routing.indices, c.num_routed_experts, flat_valid),
            balance_loss=sequence_balance_loss(routing, flat_valid, batch, c.num_routed_experts, c.num_experts_per_token),
            expert_indices=routing.indices.reshape(batch, length, -1),
        )
        return y.astype(c.dtype), aux
