"""DeepSeekMoE: shared experts plus group-limited top-k routed experts, and the dense SwiGLU MLP.

Router ("noaux_tc", DeepSeek-V3 report section 2.1.2):
    s = sigmoid(x W_gate)                                  float32, one score per routed expert
    selection uses s + b (b: e_score_correction_bias, no gradient); weights use s
    groups: a group's score is the sum of its two best biased scores; keep `num_selected_groups`
    top-k over the kept experts; w = s_topk / sum(s_topk) * routed_scaling_factor
    y = sum_k w_k expert_k(x) + shared(x)

Routed experts run dropless: token copies are sorted by expert and multiplied group by group
with `jax.lax.ragged_dot`, so each token costs k experts' FLOPs, not all of them.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.expert_parallel import routed_experts_expert_parallel
from dsjax.model.params import Kernel, Linear, logical_param
from dsjax.sharding import active_mesh


class Routing(NamedTuple):
    weights: jax.Array  # [N, k] float32, combine weights (already times routed_scaling_factor)
    indices: jax.Array  # [N, k] int32, chosen experts
    scores: jax.Array  # [N, E] float32, sigmoid affinities (for the balance loss)


def route(scores: jax.Array, bias: jax.Array, *, top_k: int, num_groups: int, num_selected_groups: int,
          routed_scaling_factor: float, norm_topk_prob: bool, forced_indices: jax.Array | None = None) -> Routing:
    """The noaux_tc router on precomputed sigmoid scores [N, E].

    `forced_indices` [N, k] replays an earlier choice of experts (RL's "keep routing"); the
    weights are still recomputed from the current scores.
    """
    num_tokens, num_experts = scores.shape
    if forced_indices is None:
        biased = scores + jax.lax.stop_gradient(bias).astype(jnp.float32)
        if num_groups > 1:
            grouped = biased.reshape(num_tokens, num_groups, num_experts // num_groups)
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
            _, best_groups = jax.lax.top_k(group_scores, num_selected_groups)
            group_kept = jnp.zeros((num_tokens, num_groups), bool).at[jnp.arange(num_tokens)[:, None], best_groups].set(True)
            expert_kept = jnp.repeat(group_kept, num_experts // num_groups, axis=1)
            biased = jnp.where(expert_kept, biased, -jnp.inf)
        _, indices = jax.lax.top_k(biased, top_k)
    else:
        indices = forced_indices.astype(jnp.int32)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * routed_scaling_factor, indices.astype(jnp.int32), scores)


def expert_load(indices: jax.Array, num_experts: int, valid: jax.Array) -> jax.Array:
    """Tokens routed to each expert, [E] float32, counting only valid (non-padding) tokens."""
    one_hot = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32)  # [N, k, E]
    return jnp.einsum("nke,n->e", one_hot, valid.astype(jnp.float32))


def sequence_balance_loss(routing: Routing, valid: jax.Array, batch: int, num_experts: int, top_k: int) -> jax.Array:
    """V3's complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    f_i = E / (k T) * #(tokens of the sequence routed to i),  P_i = mean_t s_{t,i} / sum_j s_{t,j}.
    """
    valid = valid.reshape(batch, -1).astype(jnp.float32)
    tokens = jnp.maximum(valid.sum(-1), 1.0)  # [B]
    chosen = jax.nn.one_hot(routing.indices, num_experts, dtype=jnp.float32).sum(-2).reshape(batch, -1, num_experts)
    frac = num_experts / (top_k * tokens)[:, None] * jnp.einsum("bte,bt->be", chosen, valid)
    normalised = routing.scores / (routing.scores.sum(-1, keepdims=True) + 1e-20)
    prob = jnp.einsum("bte,bt->be", normalised.reshape(batch, -1, num_experts), valid) / tokens[:, None]
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(frac) * prob, axis=-1))


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
        router = _Router(c, name="router")
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


class _Router(nn.Module):
    config: object

    @nn.compact
    def __call__(self, tokens: jax.Array, forced_indices: jax.Array | None) -> Routing:
        c = self.config
        kernel = logical_param(self, "kernel", (c.hidden_size, c.num_routed_experts), ("embed", "expert"),
                               nn.initializers.normal(c.initializer_range), jnp.dtype(c.param_dtype))
        # Updated by the training loop (aux-loss-free balancing), never by the optimizer.
        bias = logical_param(self, "e_score_correction_bias", (c.num_routed_experts,), ("expert",),
                             nn.initializers.zeros, jnp.float32)
        scores = jax.nn.sigmoid(tokens.astype(jnp.float32) @ kernel.astype(jnp.float32))
        return route(scores, bias, top_k=c.num_experts_per_token, num_groups=c.num_expert_groups,
                     num_selected_groups=c.num_selected_groups, routed_scaling_factor=c.routed_scaling_factor,
                     norm_topk_prob=c.norm_topk_prob, forced_indices=forced_indices)
