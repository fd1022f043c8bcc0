"""Multi-head latent attention (MLA), with DSA's top-k restriction when the model has an indexer.

    c_q = RMSNorm(x W_qa)                    q = c_q W_qb -> per head [q_nope | q_rope]
    [c_kv | k_rope] = x W_kva               c_kv = RMSNorm(c_kv)
    [k_nope | v] = c_kv W_kvb (per head)     k_rope is shared by all heads
    o = softmax(q . k * scale + mask) v W_o

RoPE rotates q_rope and k_rope only. scale = (qk_nope + qk_rope)^-0.5 * mscale^2 (YaRN).
This is the expanded (training) form; decoding reads the cached latent [c_kv | k_rope].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.indexer import LightningIndexer, indexer_cached_scores, topk_selection_mask
from dsjax.model.norms import RMSNorm
from dsjax.model.params import Kernel, Linear, contract
from dsjax.model.rope import apply_rope, attention_scaling


def softmax_scale(config) -> float:
    _, mscale_squared = attention_scaling(config.rope_scaling, config.max_position_embeddings)
    return (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5 * mscale_squared


class MLA(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        heads, nope, rope, v_dim = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.initializer_range)
        norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)

        if c.q_lora_rank is None:
            q_latent = None
            q = Linear((heads, nope + rope), ("embed", "heads", "head_dim"), name="q_proj", **common)(x)
        else:
            q_latent = Linear((c.q_lora_rank,), ("embed", "q_lora"), name="q_a_proj", **common)(x)
            q_latent = RMSNorm(axis_name="q_lora", name="q_a_norm", **norm)(q_latent)
            q = Linear((heads, nope + rope), ("q_lora", "heads", "head_dim"), name="q_b_proj", **common)(q_latent)
        q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin, interleaved=c.mla_rope_interleave)

        kv = Linear((c.kv_lora_rank + rope,), ("embed", "kv_lora"), name="kv_a_proj", **common)(x)
        kv_latent = RMSNorm(axis_name="kv_lora", name="kv_a_norm", **norm)(kv[..., :c.kv_lora_rank])
        k_rope = apply_rope(kv[..., c.kv_lora_rank:], cos, sin, interleaved=c.mla_rope_interleave)

        kv_b = Kernel((c.kv_lora_rank, heads, nope + v_dim), ("kv_lora", "heads", "head_dim"),
                      init_std=c.initializer_range, param_dtype=c.param_dtype, name="kv_b_proj")().astype(c.dtype)
        k_nope = jnp.einsum("bsc,chd->bshd", kv_latent, kv_b[..., :nope])
        values = jnp.einsum("bsc,chd->bshd", kv_latent, kv_b[..., nope:])

        if c.use_indexer:
            index_scores = LightningIndexer(c, name="indexer")(x, q_latent, cos, sin, attention_mask)
            attention_mask = topk_selection_mask(index_scores, c.index_topk, attention_mask)

        scores = (jnp.einsum("bthd,bshd->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
        scores = scores * softmax_scale(c)
        scores = jnp.where(attention_mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
        out = jnp.einsum("bhts,bshd->bthd", probs, values)
        return Linear((c.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj", **common)(out)


# ---------------------------------------------------------------------------------------------
# Decoding over a latent cache (absorbed form).
#
# The cache holds, per token, only [c_kv | k_rope] (kv_lora_rank + qk_rope_head_dim values).
# With W_uk = kv_b[..., :nope] and W_uv = kv_b[..., nope:]:
#     q_nope . k_nope[s] = q_nope . (c_kv[s] W_uk) = (q_nope W_uk^T) . c_kv[s]
#     sum_s p_s v[s]     = (sum_s p_s c_kv[s]) W_uv
# so each head's query becomes [q_nope W_uk^T | q_rope] and attention is MQA over the one
# shared (kv_lora + rope)-dim cached key; values are the cached latents themselves.
# ---------------------------------------------------------------------------------------------


def _linear(params, x, dtype, in_dims=1):
    """What `Linear` computes, from its param subtree."""
    return contract(x, params["kernel"], in_dims, dtype)


def _rms_norm(params, x, config, axis_name):
    return RMSNorm(eps=config.rms_norm_eps, axis_name=axis_name, dtype=config.dtype,
                   param_dtype=config.param_dtype).apply({"params": params}, x)


def mla_cached(params, x, cos, sin, cache_kv, cache_index_keys, write_index, key_mask, config):
    """MLA for new tokens against a latent cache, in the absorbed form.

    Args:
      params: one layer's `attention` subtree (the same params the training module uses).
      x: [B, Tq, D] normalised hidden states of the new tokens (Tq = 1 when decoding).
      cos, sin: [B, Tq, qk_rope_head_dim // 2] rope tables at the new tokens' positions.
      cache_kv: [B, S, kv_lora_rank + qk_rope_head_dim], the layer's cached [c_kv | k_rope].
      cache_index_keys: [B, S, index_head_dim] the indexer's key cache (V3.2), else None.
      write_index: the cache column of the first new token; new tokens fill
        [write_index, write_index + Tq) (same for every row: prompts are left-padded).
      key_mask: [B, Tq, S] bool, the cached columns each new token may attend to (after writing).

    Returns (output [B, Tq, D], new cache entries [B, Tq, kv_lora + rope],
    new indexer keys [B, Tq, index_head_dim] or None). The caller writes the entries into its
    cache at `write_index`; attention here already sees them.

    With the indexer, a single decode token (Tq = 1) gathers its top-k cached rows and attends
    only to them; several new tokens (prefill) use the top-k as a mask over the cache.
    """
    c = config
    nope, rope, lora = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    dtype = c.dtype

    if c.q_lora_rank is None:
        q_latent = None
        q = _linear(params["q_proj"], x, dtype)
    else:
        q_latent = _rms_norm(params["q_a_norm"], _linear(params["q_a_proj"], x, dtype), c, "q_lora")
        q = _linear(params["q_b_proj"], q_latent, dtype)
    q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin, interleaved=c.mla_rope_interleave)

    kv = _linear(params["kv_a_proj"], x, dtype)
    kv_latent = _rms_norm(params["kv_a_norm"], kv[..., :lora], c, "kv_lora")
    k_rope = apply_rope(kv[..., lora:], cos, sin, interleaved=c.mla_rope_interleave)
    new_entries = jnp.concatenate([kv_latent, k_rope], axis=-1).astype(cache_kv.dtype)
    cache_kv = jax.lax.dynamic_update_slice_in_dim(cache_kv, new_entries, write_index, axis=1)

    kv_b = params["kv_b_proj"]["kernel"].astype(dtype)  # [kv_lora, heads, nope + v]
    query = jnp.concatenate([jnp.einsum("bthd,chd->bthc", q_nope, kv_b[..., :nope]), q_rope.astype(dtype)], -1)

    new_index_keys = None
    gather = None
    if c.use_indexer:
        index_scores, new_index_keys, cache_index_keys = indexer_cached_scores(
            params["indexer"], x, q_latent, cos, sin, cache_index_keys, write_index, key_mask, c)
        if x.shape[1] == 1 and c.index_topk < cache_kv.shape[1]:
            _, gather = jax.lax.top_k(index_scores, c.index_topk)  # [B, 1, k]
        else:
            key_mask = topk_selection_mask(index_scores, c.index_topk, key_mask)

    scale = softmax_scale(c)
    neg = jnp.finfo(jnp.float32).min
    if gather is None:  # every cached column, masked
        scores = jnp.einsum("bthd,bsd->bhts", query, cache_kv.astype(dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(key_mask[:, None], scores * scale, neg)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        latent_out = jnp.einsum("bhts,bsc->bthc", probs, cache_kv[..., :lora].astype(dtype))
    else:  # only the k selected columns
        rows = jnp.arange(x.shape[0])[:, None, None]
        keys = cache_kv[rows, gather].astype(dtype)  # [B, 1, k, lora + rope]
        selected_mask = jnp.take_along_axis(key_mask, gather, axis=-1)  # [B, 1, k]
        scores = jnp.einsum("bthd,btkd->bhtk", query, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(selected_mask[:, None], scores * scale, neg)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        latent_out = jnp.einsum("bhtk,btkc->bthc", probs, keys[..., :lora])
    out = jnp.einsum("bthc,chv->bthv", latent_out, kv_b[..., nope:])
    return _linear(params["o_proj"], out, dtype, in_dims=2), new_entries, new_index_keys
