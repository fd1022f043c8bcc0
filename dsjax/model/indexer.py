"""The V3.2 lightning indexer: which `index_topk` keys each query attends to (DSA).

    q_I = c_q W_Iq                  [T, H_I, d_I]   (c_q: MLA's normalised query latent)
    k_I = LayerNorm(x W_Ik)         [T, d_I]        (one key per token, shared by the heads)
    w   = (x W_Iw) * H_I^-0.5       [T, H_I]
    I[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . k_I[s] * d_I^-0.5)      for s <= t, same document
    S_t = top-k_s I[t, s]

RoPE (half-split layout) rotates the first `qk_rope_head_dim` dims of q_I and k_I.
The module returns these parts, not I: `dsjax.kernels.indexer_topk` scores them block by block
and keeps only the top-k, so no [T, T] tensor exists. `index_scores_at` recomputes I at given
keys (the sparse stage's differentiable KL input), O(T K H_I d_I).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.kernels.chunking import map_query_chunks
from dsjax.kernels.indexer_topk import index_scores
from dsjax.kernels.sparse_mla import _gather_rows
from dsjax.model.norms import LayerNorm
from dsjax.model.params import Linear
from dsjax.model.rope import apply_rope


class IndexerParts(NamedTuple):
    queries: jax.Array  # q_I [B, T, H_I, d_I], RoPE applied (compute dtype)
    keys: jax.Array  # k_I [B, T, d_I], RoPE applied (compute dtype)
    weights: jax.Array  # w [B, T, H_I] float32, already times H_I^-0.5


class LightningIndexer(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x: jax.Array, q_latent: jax.Array, cos: jax.Array, sin: jax.Array) -> IndexerParts:
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
        return IndexerParts(q, k, weights.astype(jnp.float32) * c.index_num_heads ** -0.5)


def index_scores_at(parts: IndexerParts, indices: jax.Array, *, scale: float,
                    query_chunk: int | None = None) -> jax.Array:
    """I[t, indices[t, j]] as [B, T, K] float32 (-inf at -1 slots), differentiable in the parts.

    Gathers each query's K index keys, so the cost is O(T K H_I d_I) and no [T, S] tensor
    exists; queries run in chunks under `jax.checkpoint` (autodiff then keeps one chunk's
    [c, K, d_I] gathered keys alive, not the whole [T, K, d_I]).
    """
    queries, keys, weights = parts
    batch, _, heads, dim = queries.shape
    k = indices.shape[-1]
    if query_chunk is None:  # ~8 MiB of gathered keys and logits per chunk
        query_chunk = max(1, (8 << 20) // max(1, 4 * batch * k * (dim + heads)))

    def chunk(q, w, idx):  # [B, c, H_I, d], [B, c, H_I], [B, c, K]
        rows, valid = _gather_rows(keys, idx)  # [B, c, K, d]: each query's own keys
        return jnp.where(valid, index_scores(q, rows, w, scale), -jnp.inf)

    return map_query_chunks(chunk, (queries, weights, indices), (0, 0, -1), query_chunk, checkpoint=True)
