"""The V3.2 lightning indexer: which `index_topk` keys each query attends to (DSA).

    q_I = c_q W_Iq                  [T, H_I, d_I]   (c_q: MLA's normalised query latent)
    k_I = LayerNorm(x W_Ik)         [T, d_I]        (one key per token, shared by the heads)
    w   = (x W_Iw) * H_I^-0.5       [T, H_I]
    I[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . k_I[s] * d_I^-0.5)      for s <= t, same document
    S_t = top-k_s I[t, s]

RoPE (half-split layout) rotates the first `qk_rope_head_dim` dims of q_I and k_I.
This module is the pure-JAX reference: it materialises I as [B, T, T].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.norms import LayerNorm
from dsjax.model.params import Linear, contract
from dsjax.model.rope import apply_rope


class LightningIndexer(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x: jax.Array, q_latent: jax.Array, cos: jax.Array, sin: jax.Array,
                 attention_mask: jax.Array) -> jax.Array:
        """Index scores [B, T, S] in float32, -inf where the mask forbids attending."""
        c = self.config
        rope_dim = c.qk_rope_head_dim
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.initializer_range)
        q = Linear((c.index_num_heads, c.index_head_dim), ("q_lora", "index_heads", "index_head_dim"),
                   name="wq_b", **common)(q_latent)
        k = Linear((c.index_head_dim,), ("embed", "index_head_dim"), name="wk", **common)(x)
        k = LayerNorm(eps=1e-6, axis_name="index_head_dim", dtype=c.dtype, param_dtype=c.param_dtype,
                      name="k_norm")(k)
        q = jnp.concatenate([apply_rope(q[..., :rope_dim], cos, sin, interleaved=False), q[..., rope_dim:]], -1)
        k = jnp.concatenate([apply_rope(k[..., :rope_dim], cos, sin, interleaved=False), k[..., rope_dim:]], -1)
        # The head weights stay in float32, as in DeepSeek's release (HF keeps weights_proj in fp32).
        weights = Linear((c.index_num_heads,), ("embed", "index_heads"), name="weights_proj", **common)(x)
        weights = weights.astype(jnp.float32) * c.index_num_heads ** -0.5
        logits = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), k.astype(jnp.float32))
        logits = jax.nn.relu(logits * c.index_head_dim ** -0.5)
        scores = jnp.einsum("bths,bth->bts", logits, weights)
        scores = jnp.where(attention_mask, scores, -jnp.inf)
        self.sow("intermediates", "index_scores", scores)
        return scores


def topk_selection_mask(index_scores: jax.Array, topk: int, attention_mask: jax.Array) -> jax.Array:
    """Boolean [B, T, S]: True at each query's top-k keys that it may attend to.

    k is clipped to the sequence length; queries with fewer than k visible keys keep all of
    them (the -inf scores picked to fill their quota are removed by `attention_mask`).
    """
    batch, length, keys = index_scores.shape
    k = min(topk, keys)
    _, indices = jax.lax.top_k(index_scores, k)
    selected = jnp.zeros(index_scores.shape, bool)
    selected = selected.at[jnp.arange(batch)[:, None, None], jnp.arange(length)[None, :, None], indices].set(True)
    return selected & attention_mask


def indexer_cached_scores(params, x, q_latent, cos, sin, cache_keys, write_index, key_mask, config):
    """Index scores of new tokens against the indexer's key cache (decoding; same params as
    `LightningIndexer`).

    x [B, Tq, D], q_latent [B, Tq, q_lora_rank], cos/sin [B, Tq, rope/2]; cache_keys
    [B, S, index_head_dim]; the new tokens' keys go to columns [write_index, write_index + Tq).
    key_mask [B, Tq, S] marks the columns each new token may see.

    Returns (scores [B, Tq, S] float32, -inf where masked; the new keys [B, Tq, index_head_dim];
    the updated cache).
    """
    c = config
    rope_dim, dtype = c.qk_rope_head_dim, c.dtype
    q = contract(q_latent, params["wq_b"]["kernel"], 1, dtype)
    k = contract(x, params["wk"]["kernel"], 1, dtype)
    k = LayerNorm(eps=1e-6, axis_name="index_head_dim", dtype=dtype, param_dtype=c.param_dtype).apply(
        {"params": params["k_norm"]}, k)
    q = jnp.concatenate([apply_rope(q[..., :rope_dim], cos, sin, interleaved=False), q[..., rope_dim:]], -1)
    k = jnp.concatenate([apply_rope(k[..., :rope_dim], cos, sin, interleaved=False), k[..., rope_dim:]], -1)
    new_keys = k.astype(cache_keys.dtype)
    cache_keys = jax.lax.dynamic_update_slice_in_dim(cache_keys, new_keys, write_index, axis=1)
    weights = contract(x, params["weights_proj"]["kernel"], 1, dtype)
    weights = weights.astype(jnp.float32) * c.index_num_heads ** -0.5
    logits = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), cache_keys.astype(jnp.float32))
    logits = jax.nn.relu(logits * c.index_head_dim ** -0.5)
    scores = jnp.einsum("bths,bth->bts", logits, weights)
    return jnp.where(key_mask, scores, -jnp.inf), new_keys, cache_keys
