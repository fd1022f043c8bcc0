"""The model over a latent KV cache: prefill and one-token decode steps, for generation.

The cache stores only what MLA needs to rebuild attention in the absorbed form, per layer and
token: the normalised KV latent c_kv (kv_lora_rank) and the rotated shared rope key
(qk_rope_head_dim); V3.2 models add the lightning indexer's key (index_head_dim). Nothing per head.

Rows are **left-padded**: row b's tokens occupy cache columns [starts[b], ...), and every new token
of a step goes to the same column in every row, so a decode step writes one column with
`dynamic_update_slice`. Positions restart at 0 at `starts[b]`; padding columns are never attended
to by real tokens (and padding attends only to padding, as `attention_mask_for` does in training).

`forward_cached` runs the same layers as `transformer.forward` (same parameter pytree; the
dense/MoE stacks are scanned with `lax.scan`) and returns the routed experts it chose, in the
layout `forward(..., forced_routing=...)` accepts.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.mla import mla_cached
from dsjax.model.moe import MLP, MoE
from dsjax.model.router import Router as _Router
from dsjax.model.norms import RMSNorm
from dsjax.model.params import contract
from dsjax.model.rope import rope_tables

STACKS = ("dense_layers", "moe_layers")


class LayerCache(NamedTuple):
    """One layer stack's cache (leading axis: the stack's layers)."""

    kv: jax.Array  # [L, B, S, kv_lora_rank + qk_rope_head_dim]: [c_kv | k_rope] per token
    index_keys: jax.Array | None  # [L, B, S, index_head_dim] (V3.2 indexer), else None


def _stack_sizes(config) -> dict[str, int]:
    return {"dense_layers": config.num_dense_layers, "moe_layers": config.num_layers - config.num_dense_layers}


def init_cache(config, batch: int, length: int, dtype=None) -> dict[str, LayerCache]:
    """An empty cache for `length` tokens per row, keyed by layer stack. dtype: config.dtype."""
    dtype = jnp.dtype(dtype or config.dtype)
    cache = {}
    for name, count in _stack_sizes(config).items():
        if count:
            kv = jnp.zeros((count, batch, length, config.kv_lora_rank + config.qk_rope_head_dim), dtype)
            index_keys = (jnp.zeros((count, batch, length, config.index_head_dim), dtype)
                          if config.use_indexer else None)
            cache[name] = LayerCache(kv, index_keys)
    return cache


def cache_bytes_per_token(config, dtype="bfloat16") -> dict[str, int]:
    """Bytes of cache one token needs over all decoder layers (MTP modules not included).

    latent: MLA's [c_kv | k_rope]; indexer: V3.2's index keys; total: what `init_cache` stores;
    uncompressed: a conventional cache of per-head K (qk_nope + qk_rope) and V (v_head_dim).
    """
    size = jnp.dtype(dtype).itemsize
    layers = config.num_layers
    latent = layers * (config.kv_lora_rank + config.qk_rope_head_dim) * size
    indexer = layers * config.index_head_dim * size if config.use_indexer else 0
    per_head = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    uncompressed = layers * config.num_heads * per_head * size
    return dict(latent=latent, indexer=indexer, total=latent + indexer, uncompressed=uncompressed)


def _norm(params, x, config):
    return RMSNorm(eps=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype).apply(
        {"params": params}, x)


def _moe_few_tokens(params, x, forced, config):
    """The MoE layer for a few tokens (decode steps): gathers only the chosen experts' weights.

    Same math as `MoE` (its router, then sum_k w_k expert_k(x) + shared experts); reading k experts
    per token instead of all of them is what makes small-batch decoding memory-cheap. Used when
    tokens x k < num_routed_experts. Returns (y [B, T, D], expert indices [B, T, k]).
    """
    c = config
    batch, length, dim = x.shape
    tokens = x.reshape(-1, dim)
    k = c.num_experts_per_token
    routing = _Router(c).apply({"params": params["router"]}, tokens, None if forced is None else forced.reshape(-1, k))
    experts = params["experts"]
    gate, up, down = (experts[name]["kernel"][routing.indices].astype(c.dtype)  # [N, k, ...]
                      for name in ("gate_proj", "up_proj", "down_proj"))
    tokens = tokens.astype(c.dtype)
    hidden = nn.silu(jnp.einsum("nd,nkdf->nkf", tokens, gate)) * jnp.einsum("nd,nkdf->nkf", tokens, up)
    routed = jnp.einsum("nkf,nkfd->nkd", hidden, down)
    y = jnp.einsum("nkd,nk->nd", routed, routing.weights.astype(routed.dtype)).reshape(batch, length, dim)
    if c.num_shared_experts:
        y = y + MLP(c.moe_intermediate_size * c.num_shared_experts, c).apply({"params": params["shared_experts"]}, x)
    return y.astype(c.dtype), routing.indices.reshape(batch, length, k)


def forward_cached(params, tokens, cache, config, *, write_index, starts, forced_routing=None,
                   last_only: bool = False):
    """Run new tokens through the model, reading and extending the cache.

    Args:
      params: the model's parameter pytree (as for `transformer.forward`).
      tokens: int [B, Tq]: the new tokens, one column each, at cache columns
        [write_index, write_index + Tq) (prefill: the whole left-padded prompt at 0; decode: one).
      cache: from `init_cache` (its length S bounds the sequence).
      write_index: int scalar (may be traced).
      starts: int [B], the first real column of each row (left padding before it).
      forced_routing: optional {"moe_layers": int [L_moe, B, Tq, k]} replaying expert choices.
      last_only: compute logits only for the last new token (prefill).

    Returns (logits float32 [B, Tq or 1, vocab], updated cache, routing) where routing is
    {"moe_layers": int [L_moe, B, Tq, k]}, the experts each new token was routed to.
    """
    c = config
    forced_routing = forced_routing or {}
    batch, length = tokens.shape
    any_stack = next(iter(cache.values()))
    cache_len = any_stack.kv.shape[2]

    columns = write_index + jnp.arange(length)  # [Tq]
    starts = jnp.asarray(starts, jnp.int32)
    query_real = columns[None, :] >= starts[:, None]  # [B, Tq]
    positions = jnp.where(query_real, columns[None, :] - starts[:, None], columns[None, :])
    key_real = jnp.arange(cache_len)[None, :] >= starts[:, None]  # [B, S]
    # Segment 1: real tokens, 0: left padding (which attends only to padding, as in training).
    query_segments, key_segments = query_real.astype(jnp.int32), key_real.astype(jnp.int32)
    cos, sin = rope_tables(positions, c)

    embedding = params["embed"]["embedding"]
    h = jnp.take(embedding, tokens, axis=0).astype(c.dtype)

    new_cache, routing = {}, {}
    for name, count in _stack_sizes(c).items():
        if not count:
            continue
        use_moe = name == "moe_layers"
        forced = forced_routing.get(name)

        def layer(carry, xs, use_moe=use_moe):
            h, kv_all, index_all = carry
            layer_params, layer_forced, i = xs
            kv_layer = jax.lax.dynamic_index_in_dim(kv_all, i, 0, keepdims=False)
            index_layer = None if index_all is None else jax.lax.dynamic_index_in_dim(index_all, i, 0, keepdims=False)
            x = _norm(layer_params["attention_norm"], h, c)
            attn, entries, index_entries = mla_cached(layer_params["attention"], x, cos, sin, kv_layer, index_layer,
                                                      write_index, query_segments, key_segments, c)
            h = h + attn
            # Write only the new columns into the stacked cache (in place inside a loop).
            kv_all = jax.lax.dynamic_update_slice(kv_all, entries[None], (i, 0, write_index, 0))
            if index_all is not None:
                index_all = jax.lax.dynamic_update_slice(index_all, index_entries[None], (i, 0, write_index, 0))
            x = _norm(layer_params["mlp_norm"], h, c)
            if use_moe and batch * length * c.num_experts_per_token < c.num_routed_experts:
                y, chosen = _moe_few_tokens(layer_params["mlp"], x, layer_forced, c)
            elif use_moe:
                y, aux = MoE(c).apply({"params": layer_params["mlp"]}, x, query_real, layer_forced)
                chosen = aux["expert_indices"]
            else:
                y = MLP(c.dense_intermediate_size, c).apply({"params": layer_params["mlp"]}, x)
                chosen = None
            return (h + y, kv_all, index_all), chosen

        stack = cache[name]
        xs = (params[name], forced, jnp.arange(count))
        (h, kv_all, index_all), chosen = jax.lax.scan(layer, (h, stack.kv, stack.index_keys), xs)
        new_cache[name] = LayerCache(kv_all, index_all)
        if use_moe:
            routing[name] = chosen

    if last_only:
        h = h[:, -1:]
    h = _norm(params["final_norm"], h, c)
    head = embedding.T if c.tie_word_embeddings else params["lm_head"]["kernel"]
    logits = contract(h, head, 1, c.dtype, preferred=jnp.float32)
    return logits, new_cache, routing
