"""Multi-head latent attention (MLA), and DeepSeek Sparse Attention (DSA) when the model has an indexer.

    c_q = RMSNorm(x W_qa)                    q = c_q W_qb -> per head [q_nope | q_rope]
    [c_kv | k_rope] = x W_kva               c_kv = RMSNorm(c_kv)
    [k_nope | v] = c_kv W_kvb (per head)     k_rope is shared by all heads
    o = softmax(q . k * scale + mask) v W_o

RoPE rotates q_rope and k_rope only. scale = (qk_nope + qk_rope)^-0.5 * mscale^2 (YaRN).

Layers without an indexer (V3) run this expanded form, dense, in XLA. Layers with one (V3.2)
attend only to the indexer's top-k keys S_t, in the absorbed (MQA) form: with W_uk = W_kvb[.., :nope]
and W_uv = W_kvb[.., nope:],

    q_abs[t, h] = [q_nope[t, h] W_uk^T | q_rope[t, h]]      kv_lat[s] = [c_kv[s] | k_rope[s]]
    o[t, h] = (sum_{s in S_t} softmax_s(q_abs[t, h] . kv_lat[s] * scale) c_kv[s]) W_uv

so the layer costs O(T k) (`dsjax.kernels.sparse_mla`), and the indexer never materialises its
[T, T] scores (`dsjax.kernels.indexer_topk`). `config.attention_impl` picks the kernels' "xla"
(gather-based pure JAX) or "pallas" implementation.

`dsa_stage` (a static module attribute) selects a DSA training stage; see `dsjax.model.dsa`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsjax.model.dsa import indexer_topk, sparse_indexer_stats, sparse_mla, warmup_indexer_stats
from dsjax.model.indexer import LightningIndexer
from dsjax.model.norms import RMSNorm
from dsjax.model.params import Kernel, Linear, contract
from dsjax.model.rope import apply_rope, attention_scaling
from dsjax.parallel.mesh import multi_device_auto_mesh


def softmax_scale(config) -> float:
    _, mscale_squared = attention_scaling(config.rope_scaling, config.max_position_embeddings)
    return (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5 * mscale_squared


def attention_mask_for(segment_ids: jax.Array) -> jax.Array:
    """[B, T, S] True where query t may attend key s: causal and inside the same document.

    Padding (segment 0) attends only to padding, so no row is empty and real tokens never see it.
    The DSA kernels apply the same rule from the segment ids themselves.
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


class MLA(nn.Module):
    config: object
    dsa_stage: str | None = None  # see the module doc

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array):
        """x [B, T, D], cos/sin [B, T, rope/2], segment_ids [B, T] (0: padding) ->
        (output [B, T, D], aux: {} or, in the "warmup"/"sparse" stages of an indexer layer,
        {"indexer_kl": scalar, "topk_attention_recall": scalar})."""
        c = self.config
        stage = self.dsa_stage
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
        o_proj = Linear((c.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj", **common)

        sparse = c.use_indexer and stage in (None, "sparse")
        if not sparse:
            out = _dense_attention(q_nope, q_rope, kv_latent, k_rope, kv_b, segment_ids, c)
        if not c.use_indexer or stage == "dense":
            return o_proj(out), {}

        if stage in ("warmup", "sparse"):
            # The indexer learns only from its KL loss, which must not reach the rest of the model.
            x, q_latent = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_latent)
        parts = LightningIndexer(c, name="indexer")(x, q_latent, cos, sin)
        # Absorbed form: queries [q_nope W_uk^T | q_rope], one shared latent key [c_kv | k_rope].
        q_abs = absorbed_queries(q_nope, q_rope, kv_b[..., :nope])
        kv_lat = jnp.concatenate([kv_latent, k_rope], axis=-1)
        if stage == "warmup":
            return o_proj(out), warmup_indexer_stats(parts, q_abs, kv_lat, segment_ids, c, softmax_scale(c))

        # Top-k selection is not differentiable: no gradient reaches the indexer through it.
        indices = indexer_topk(*jax.lax.stop_gradient(parts), segment_ids, topk=c.index_topk,
                               scale=c.index_head_dim ** -0.5, impl=c.attention_impl)
        self.sow("intermediates", "topk_indices", indices)
        latent_out = sparse_mla(q_abs, kv_lat, indices, scale=softmax_scale(c), dv=c.kv_lora_rank,
                                impl=c.attention_impl)
        out = jnp.einsum("bthc,chv->bthv", latent_out, kv_b[..., nope:])
        aux = sparse_indexer_stats(parts, indices, q_abs, kv_lat, segment_ids, c, softmax_scale(c)) if stage == "sparse" else {}
        return o_proj(out), aux


def absorbed_queries(q_nope, q_rope, w_uk):
    """[q_nope W_uk^T | q_rope]: [B, T, H, kv_lora + rope], from q_nope [B, T, H, nope], q_rope
    [B, T, H, rope] and W_uk [kv_lora, H, nope].

    On a mesh W_uk is gathered whole first (it is small). Otherwise XLA may split the product's
    latent dim like the weight's kv_lora dim, and then rematerialise the whole batch on every
    device to hand the queries to the per-batch-shard kernels.
    """
    if multi_device_auto_mesh() is not None:
        w_uk = jax.lax.with_sharding_constraint(w_uk, PartitionSpec())
    return jnp.concatenate([jnp.einsum("bthd,chd->bthc", q_nope, w_uk), q_rope], axis=-1)


def _dense_attention(q_nope, q_rope, kv_latent, k_rope, kv_b, segment_ids, config):
    """Dense causal MLA in the expanded form: [B, T, H, v_head_dim] (O(T^2))."""
    c = config
    nope = c.qk_nope_head_dim
    k_nope = jnp.einsum("bsc,chd->bshd", kv_latent, kv_b[..., :nope])
    values = jnp.einsum("bsc,chd->bshd", kv_latent, kv_b[..., nope:])
    scores = (jnp.einsum("bthd,bshd->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
    scores = scores * softmax_scale(c)
    scores = jnp.where(attention_mask_for(segment_ids)[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, values)


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


def mla_cached(params, x, cos, sin, cache_kv, cache_index_keys, write_index, query_segments, key_segments, config):
    """MLA for new tokens against a latent cache, in the absorbed form.

    Args:
      params: one layer's `attention` subtree (the same params the training module uses).
      x: [B, Tq, D] normalised hidden states of the new tokens (Tq = 1 when decoding).
      cos, sin: [B, Tq, qk_rope_head_dim // 2] rope tables at the new tokens' positions.
      cache_kv: [B, S, kv_lora_rank + qk_rope_head_dim], the layer's cached [c_kv | k_rope].
      cache_index_keys: [B, S, index_head_dim] the indexer's key cache (V3.2), else None.
      write_index: the cache column of the first new token; new tokens fill
        [write_index, write_index + Tq) (same for every row: prompts are left-padded).
      query_segments: int [B, Tq], key_segments: int [B, S]: new token t sees cached column s
        when s <= write_index + t and their segments are equal (left padding: segment 0).

    Returns (output [B, Tq, D], new cache entries [B, Tq, kv_lora + rope],
    new indexer keys [B, Tq, index_head_dim] or None). The caller writes the entries into its
    cache at `write_index`; attention here already sees them.

    With the indexer, each new token attends to its top-k cached columns only (the same
    `indexer_topk` + `sparse_mla` kernels as the training forward, shifted by `q_offset`).
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
    query = absorbed_queries(q_nope, q_rope.astype(dtype), kv_b[..., :nope])
    scale = softmax_scale(c)

    new_index_keys = None
    if c.use_indexer:
        parts = LightningIndexer(c).apply({"params": params["indexer"]}, x, q_latent, cos, sin)
        new_index_keys = parts.keys.astype(cache_index_keys.dtype)
        cache_index_keys = jax.lax.dynamic_update_slice_in_dim(cache_index_keys, new_index_keys, write_index, axis=1)
        indices = indexer_topk(parts.queries, cache_index_keys, parts.weights, query_segments, topk=c.index_topk,
                               scale=c.index_head_dim ** -0.5, kv_segment_ids=key_segments, q_offset=write_index,
                               impl=c.attention_impl)
        latent_out = sparse_mla(query, cache_kv.astype(dtype), indices, scale=scale, dv=lora, impl=c.attention_impl)
    else:  # every cached column, masked
        columns = write_index + jnp.arange(x.shape[1])
        key_mask = ((jnp.arange(cache_kv.shape[1])[None, None, :] <= columns[None, :, None])
                    & (key_segments[:, None, :] == query_segments[:, :, None]))  # [B, Tq, S]
        scores = jnp.einsum("bthd,bsd->bhts", query, cache_kv.astype(dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(key_mask[:, None], scores * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        latent_out = jnp.einsum("bhts,bsc->bthc", probs, cache_kv[..., :lora].astype(dtype))
    out = jnp.einsum("bthc,chv->bthv", latent_out, kv_b[..., nope:])
    return _linear(params["o_proj"], out, dtype, in_dims=2), new_entries, new_index_keys
