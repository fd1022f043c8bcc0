"""The DeepSeekMoE router ("noaux_tc", DeepSeek-V3 report section 2.1.2) and its balancing.

    s = sigmoid(x W_gate)                                  float32, one score per routed expert
    selection uses s + b (b: e_score_correction_bias, no gradient); weights use s
    groups: a group's score is the sum of its two best biased scores; keep `num_selected_groups`
    top-k over the kept experts; w = s_topk / sum(s_topk) * routed_scaling_factor

Balancing: the complementary sequence-wise balance loss (`sequence_balance_loss`), and the
aux-loss-free bias update `b += gamma * sign(mean load - load)` after each step
(`update_router_biases`), which the optimizer never touches.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.params import logical_param
from dsjax.tree import path_names

ROUTER_BIAS = "e_score_correction_bias"


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


class Router(nn.Module):
    config: object

    @nn.compact
    def __call__(self, tokens: jax.Array, forced_indices: jax.Array | None) -> Routing:
        c = self.config
        kernel = logical_param(self, "kernel", (c.hidden_size, c.num_routed_experts), ("embed", "expert"),
                               nn.initializers.normal(c.initializer_range), jnp.dtype(c.param_dtype))
        # Updated by the training loop (aux-loss-free balancing), never by the optimizer.
        bias = logical_param(self, ROUTER_BIAS, (c.num_routed_experts,), ("expert",),
                             nn.initializers.zeros, jnp.float32)
        scores = jax.nn.sigmoid(tokens.astype(jnp.float32) @ kernel.astype(jnp.float32))
        return route(scores, bias, top_k=c.num_experts_per_token, num_groups=c.num_expert_groups,
                     num_selected_groups=c.num_selected_groups, routed_scaling_factor=c.routed_scaling_factor,
                     norm_topk_prob=c.norm_topk_prob, forced_indices=forced_indices)


def router_bias_paths(params: Any) -> dict[str, tuple[str, ...]]:
    """Top-level params key -> path of the one router bias inside that subtree.

    E.g. {"moe_layers": ("moe_layers", "mlp", "router", "e_score_correction_bias"), "mtp_0": (...)}.
    These keys are the keys of the model's routing aux (`ModelOutput.aux`).
    """
    found: dict[str, tuple[str, ...]] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = path_names(path)
        if names and names[-1] == ROUTER_BIAS:
            if names[0] in found:
                raise ValueError(f"params[{names[0]!r}] holds more than one {ROUTER_BIAS}: "
                                 f"{'/'.join(found[names[0]])} and {'/'.join(names)}")
            found[names[0]] = names
    return found


def expert_loads(aux: Any) -> dict[str, jax.Array]:
    """{aux key: expert load} of every router-holding entry of a model's aux."""
    if not isinstance(aux, Mapping):
        return {}
    return {key: stats["expert_load"] for key, stats in aux.items()
            if isinstance(stats, Mapping) and "expert_load" in stats}


def update_router_biases(params: Any, loads: Mapping[str, jax.Array], rate: float) -> Any:
    """b += rate * sign(mean(load) - load) for each router, per layer (aux-loss-free balancing).

    loads: aux key (top-level params key) -> tokens per expert, shaped like that router's bias
    ([L, E] for a scanned stack, [E] otherwise); the mean is over experts (the last axis), separately
    for each layer. Every other leaf is returned as it is.
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
        load = targets.get(path_names(path))
        if load is None:
            return leaf
        if load.shape != leaf.shape:
            raise ValueError(f"expert load {load.shape} does not match the router bias "
                             f"{'/'.join(path_names(path))} {leaf.shape}")
        load = load.astype(jnp.float32)
        step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return (leaf.astype(jnp.float32) + rate * step).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(visit, params)
