"""Multi-head latent attention (MLA), and DeepSeek Sparse Attention (DSA) when the model has an indexer.

    c_q = RMSNorm(x W_qa)                    q = c_q W_qb -> per head [q_nope | q_rope]
    [c_kv | k_rope] = x W_kva               c_kv = RMSNorm(c_kv)
    [k_nope | v] = c_kv W_kvb (per head)     k_rope is shared by all heads
    o = softmax(q . k * scale + mask) v W_o

RoPE rotates q_rope and k_rope only. scale = (qk_nope + qk_rope)^-0.5 * mscale^2 (YaRN).

Layers without an indexer (V3) run dense attention in XLA. Layers with one (V3.2) attend only to
the indexer's top-k keys S_t, in the absorbed (MQA) form: with W_uk = W_kvb[.., :nope] and
W_uv = W_kvb[.., nope:],

    q_abs[t, h] = [q_nope[t, h] W_uk^T | q_rope[t, h]]      kv_lat[s] = [c_kv[s] | k_rope[s]]
    o[t, h] = (sum_{s in S_t} softmax_s(q_abs[t, h] . kv_lat[s] * scale) c_kv[s]) W_uv

so the layer costs O(T k) (`dsjax.kernels.sparse_mla`), and the indexer never materialises its
[T, T] scores (`dsjax.kernels.indexer_topk`). `config.attention_impl` picks the kernels' "xla"
(gather-based pure JAX) or "pallas" implementation.

One body serves training, prefill and decode: with `cache=None` the tokens attend to each other;
with a `LayerCache` they are written into it first and attend to every cached column. Only the
latent [c_kv | k_rope] is cached, so dense decode also runs absorbed (MQA over one 576-dim key per
token); dense attention without a cache uses the expanded form, cheaper when queries = keys.

`dsa_stage` (a static module attribute) selects a DSA training stage; see `dsjax.model.dsa`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsjax import kernels

from dsjax.model.dsa import indexer_topk, sparse_indexer_stats, sparse_mla, warmup_indexer_stats
from dsjax.model.indexer import LightningIndexer
from dsjax.model.norms import RMSNorm
from dsjax.model.params import Kernel, Linear
from dsjax.model.rope import apply_rope, attention_scaling
from dsjax.parallel.mesh import multi_device_auto_mesh


def softmax_scale(config) -> float:
    _, mscale_squared = attention_scaling(config.rope_scaling, config.max_position_embeddings)
    return (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5 * mscale_squared


def attention_mask(query_segments: jax.Array, key_segments: jax.Array, query_offset=0) -> jax.Array:
    """[B, Tq, S] True where query t may attend key column s: s <= query_offset + t, same segment.

    Padding (segment 0) attends only to padding, so no row is empty and real tokens never see it;
    the DSA kernels apply the same rule (`dsjax.kernels.visibility`).
    """
    batch, length = query_segments.shape
    query_positions = query_offset + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    key_positions = jnp.arange(key_segments.shape[-1], dtype=jnp.int32)
    return kernels.visibility(query_positions, query_segments, key_positions, key_segments)


class LayerCache(NamedTuple):
    """One layer's latent KV cache (with a leading layer axis when it belongs to a scanned stack).

    Per cached column only what the absorbed form needs: [c_kv | k_rope], and V3.2's index key.
    Which columns are filled, and with which segment, is kept once for all layers (`dsjax.model.cache`).
    """

    kv: jax.Array  # [B, S, kv_lora_rank + qk_rope_head_dim]
    index_keys: jax.Array | None  # [B, S, index_head_dim] (V3.2 indexer), else None


class MLA(nn.Module):
    config: object
    dsa_stage: str | None = None  # see the module doc

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None, cache_segments: jax.Array | None = None, cache_index=None):
        """x [B, T, D], cos/sin [B, T, rope/2], segment_ids [B, T] (0: padding) ->
        (output [B, T, D], aux, cache).

        Without a cache the T tokens attend to each other (training, scoring). With one, they are
        written into its columns [cache_index, cache_index + T) and attend to every cached column
        (prefill, decode): cache_segments [B, S] holds each column's segment after this write.
        aux is {} or, in the "warmup"/"sparse" stages of an indexer layer, {"indexer_kl": scalar,
        "topk_attention_recall": scalar}; the returned cache is the updated one (None without).
        """
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
        kv_lat = jnp.concatenate([kv_latent, k_rope], axis=-1)  # [c_kv | k_rope]: the shared latent key

        kv_b = Kernel((c.kv_lora_rank, heads, nope + v_dim), ("kv_lora", "heads", "head_dim"),
                      init_std=c.initializer_range, param_dtype=c.param_dtype, name="kv_b_proj")().astype(c.dtype)
        o_proj = Linear((c.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj", **common)

        if cache is None:  # keys: this call's own tokens
            keys, key_segments, query_offset = kv_lat, segment_ids, 0
        else:  # keys: every cached column, this call's tokens written in first
            if stage is not None:
                raise ValueError(f"dsa_stage={stage!r} is a training stage; it does not run over a cache")
            cache = cache._replace(kv=_write(cache.kv, kv_lat, cache_index))
            keys, key_segments, query_offset = cache.kv.astype(c.dtype), cache_segments, cache_index
        mask = lambda: attention_mask(segment_ids, key_segments, query_offset)  # noqa: E731

        sparse = c.use_indexer and stage in (None, "sparse")
        if not sparse and cache is None:
            out = _expanded_attention(q_nope, q_rope, keys, kv_b, mask(), c)
        elif not sparse:  # a few queries against many cached keys: absorbed
            q_abs = absorbed_queries(q_nope, q_rope, kv_b[..., :nope])
            out = _latent_values(_absorbed_attention(q_abs, keys, mask(), c), kv_b, nope)
        if not c.use_indexer or stage == "dense":
            return o_proj(out), {}, cache

        if stage in ("warmup", "sparse"):
            # The indexer learns only from its KL loss, which must not reach the rest of the model.
            x, q_latent = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_latent)
        parts = LightningIndexer(c, name="indexer")(x, q_latent, cos, sin)
        index_keys = parts.keys
        if cache is not None:
            cache = cache._replace(index_keys=_write(cache.index_keys, parts.keys, cache_index))
            index_keys = cache.index_keys.astype(parts.keys.dtype)
        q_abs = absorbed_queries(q_nope, q_rope, kv_b[..., :nope])
        if stage == "warmup":
            return o_proj(out), warmup_indexer_stats(parts, q_abs, kv_lat, segment_ids, c, softmax_scale(c)), cache

        # Top-k selection is not differentiable: no gradient reaches the indexer through it.
        indices = indexer_topk(*jax.lax.stop_gradient((parts.queries, index_keys, parts.weights)), segment_ids,
                               topk=c.index_topk, scale=c.index_head_dim ** -0.5, kv_segment_ids=key_segments,
                               q_offset=query_offset, impl=c.attention_impl)
        self.sow("intermediates", "topk_indices", indices)
        latent_out = sparse_mla(q_abs, keys, indices, scale=softmax_scale(c), dv=c.kv_lora_rank,
                                impl=c.attention_impl)
        aux = {}
        if stage == "sparse":
            aux = sparse_indexer_stats(parts, indices, q_abs, kv_lat, segment_ids, c, softmax_scale(c))
        return o_proj(_latent_values(latent_out, kv_b, nope)), aux, cache


def _write(cache_column_values: jax.Array, new: jax.Array, index) -> jax.Array:
    """Cached values [B, S, ...] with new [B, T, ...] written into columns [index, index + T)."""
    return jax.lax.dynamic_update_slice_in_dim(cache_column_values, new.astype(cache_column_values.dtype), index, axis=1)


def absorbed_queries(q_nope, q_rope, w_uk):
    """[q_nope W_uk^T | q_rope]: [B, T, H, kv_lora + rope], from q_nope [B, T, H, nope], q_rope
    [B, T, H, rope] and W_uk [kv_lora, H, nope].

    On a mesh W_uk is gathered whole first (it is small). Otherwise XLA may split the product's
    latent dim like the weight's kv_lora dim, and then rematerialise the whole batch on every
    device to hand the queries to the per-batch-shard kernels.
    """
    if multi_device_auto_mesh() is not None:
        w_uk = jax.lax.with_sharding_constraint(w_uk, PartitionSpec())
    return jnp.concatenate([jnp.einsum("bthd,chd->bthc", q_nope, w_uk), q_rope.astype(q_nope.dtype)], axis=-1)


def _latent_values(latent_out, kv_b, nope: int):
    """Per-head attention output in the latent space [B, T, H, kv_lora] -> values [B, T, H, v] (W_uv)."""
    return jnp.einsum("bthc,chv->bthv", latent_out, kv_b[..., nope:])


def _expanded_attention(q_nope, q_rope, keys, kv_b, mask, config):
    """Dense MLA in the expanded form over latent keys [B, S, kv_lora + rope]: [B, T, H, v_head_dim].

    Keys and values are expanded per head (k_nope = c_kv W_uk, v = c_kv W_uv): the cheaper form when
    as many queries as keys attend (training, scoring), O(T S H (nope + rope)).
    """
    c = config
    nope, lora = c.qk_nope_head_dim, c.kv_lora_rank
    kv_latent, k_rope = keys[..., :lora], keys[..., lora:]
    k_nope = jnp.einsum("bsc,chd->bshd", kv_latent, kv_b[..., :nope])
    values = jnp.einsum("bsc,chd->bshd", kv_latent, kv_b[..., nope:])
    scores = (jnp.einsum("bthd,bshd->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
    probs = _masked_softmax(scores * softmax_scale(c), mask).astype(c.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, values)


def _absorbed_attention(q_abs, keys, mask, config):
    """Dense MLA in the absorbed (MQA) form: [B, T, H, kv_lora], the latent-space output. The
    cheaper form for a few queries over many cached keys (decode), O(T S H (kv_lora + rope))."""
    c = config
    scores = jnp.einsum("bthd,bsd->bhts", q_abs, keys, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores * softmax_scale(c), mask).astype(c.dtype)
    return jnp.einsum("bhts,bsc->bthc", probs, keys[..., :c.kv_lora_rank])


def _masked_softmax(scores, mask):
    """softmax over keys of float32 scores [B, H, T, S] where mask [B, T, S] allows."""
    return jax.nn.softmax(jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
