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

from dsjax.model.indexer import LightningIndexer, topk_selection_mask
from dsjax.model.norms import RMSNorm
from dsjax.model.params import Kernel, Linear
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
