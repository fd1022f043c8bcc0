"""DeepSeek Sparse Attention training stages (V3.2 report, section 2.1): the stages, their
statistics, and the DSA kernels as the model calls them.

`dsa_stage` (a static attribute of the model) selects a stage:

    None      sparse attention over S_t (inference and ordinary training)
    "dense"   dense attention, the indexer unused (the V3 math)
    "warmup"  dense attention; the indexer (its inputs detached) is scored against the target
              p[t, :] = (1/H) sum_h softmax_s(q_abs[t, h] . kv_lat[s] * scale):
              indexer_kl = mean_t KL(p[t, :] || softmax(I[t, :]))
    "sparse"  sparse attention as None; the indexer's inputs are detached, and
              indexer_kl = mean_t KL(p[t, S_t] || softmax(I[t, S_t])), with p[t, S_t] the sparse
              attention's own head-averaged probabilities
Both stages also report topk_attention_recall = mean_t sum_{s in S_t} p_dense[t, s], the share of
the dense attention mass the top-k keeps. Means run over non-padding queries (segment id > 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax import kernels
from dsjax.kernels.indexer_topk import index_scores_reference
from dsjax.model.indexer import IndexerParts, index_scores_at
from dsjax.parallel.per_shard import per_batch_shard

# None: sparse attention over S_t when the model has an indexer (dense otherwise).
DSA_STAGES = (None, "dense", "warmup", "sparse")


def check_dsa_stage(dsa_stage) -> None:
    if dsa_stage not in DSA_STAGES:
        raise ValueError(f"dsa_stage={dsa_stage!r} must be one of {DSA_STAGES}")


# The DSA kernels as the layers call them: per batch shard under a mesh (`dsjax.parallel.per_shard`).
indexer_topk = per_batch_shard(kernels.indexer_topk)
sparse_mla = per_batch_shard(kernels.sparse_mla)
attention_lse = per_batch_shard(kernels.attention_lse)
attention_target = per_batch_shard(kernels.attention_target)
attention_target_at = per_batch_shard(kernels.attention_target_at)


def _masked_mean(values: jax.Array, query_valid: jax.Array) -> jax.Array:
    weight = query_valid.astype(jnp.float32)
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def indexer_kl(target: jax.Array, index_logits: jax.Array, query_valid: jax.Array) -> jax.Array:
    """mean over valid queries of KL(target[t] || softmax(index_logits[t])), float32 scalar.

    target [B, T, N] sums to 1 per query and is 0 wherever index_logits is -inf (keys or slots
    the query cannot use); those entries drop out (0 log 0 = 0).
    """
    usable = index_logits > -jnp.inf
    log_q = jnp.where(usable, jax.nn.log_softmax(index_logits, axis=-1), 0.0)
    positive = target > 0
    p_log_p = jnp.where(positive, target * jnp.log(jnp.where(positive, target, 1.0)), 0.0)
    return _masked_mean(jnp.sum(p_log_p - target * log_q, axis=-1), query_valid)


def warmup_indexer_stats(parts: IndexerParts, q_abs, kv_lat, segment_ids, config, scale: float) -> dict:
    """Dense warm-up: KL(p[t, :] || softmax(I[t, :])) over every visible key, and top-k recall.

    O(T^2) like the warm-up's dense attention: the full index scores I [B, T, S] are formed.
    """
    c = config
    target = attention_target(q_abs, kv_lat, segment_ids, scale=scale, impl=c.attention_impl)
    scores = index_scores_reference(*parts, segment_ids, scale=c.index_head_dim ** -0.5)
    _, top = jax.lax.top_k(jax.lax.stop_gradient(scores), min(c.index_topk, scores.shape[-1]))
    recall = jnp.sum(jnp.take_along_axis(target, top, axis=-1), axis=-1)  # p is 0 at invisible keys
    valid = segment_ids > 0
    return dict(indexer_kl=indexer_kl(target, scores, valid), topk_attention_recall=_masked_mean(recall, valid))


def sparse_indexer_stats(parts: IndexerParts, indices, q_abs, kv_lat, segment_ids, config, scale: float) -> dict:
    """Sparse stage: KL(p[t, S_t] || softmax(I[t, S_t])) over the selected slots, and top-k recall.

    p[t, S_t]: the sparse attention's head-averaged probabilities (O(T k)); I at the selected keys
    is recomputed differentiably (O(T k H_I d_I)). The recall needs the dense log-sum-exp
    (`attention_lse`: O(T^2) time, O(T) memory).
    """
    c = config
    impl = c.attention_impl
    target = attention_target_at(q_abs, kv_lat, indices, scale=scale, normalize=True, impl=impl)
    scores = index_scores_at(parts, indices, scale=c.index_head_dim ** -0.5)
    dense_lse = attention_lse(q_abs, kv_lat, segment_ids, scale=scale, impl=impl)
    kept = attention_target_at(q_abs, kv_lat, indices, scale=scale, lse=dense_lse, normalize=False, impl=impl)
    valid = segment_ids > 0
    return dict(indexer_kl=indexer_kl(target, scores, valid),
                topk_attention_recall=_masked_mean(jnp.sum(kept, axis=-1), valid))




def indexer_stats(aux: dict) -> tuple[jax.Array, jax.Array]:
    """(mean indexer KL, mean top-k attention recall) over every indexer layer in a model's aux."""
    kl = [jnp.ravel(stats["indexer_kl"]) for stats in aux.values() if "indexer_kl" in stats]
    if not kl:
        raise ValueError("the model reported no indexer statistics: dsa_stage 'warmup' and 'sparse' need a "
                         "model with an indexer (model.use_indexer=True, a V3.2 preset)")
    recall = [jnp.ravel(stats["topk_attention_recall"]) for stats in aux.values() if "indexer_kl" in stats]
    return (jnp.mean(jnp.concatenate(kl).astype(jnp.float32)),
            jnp.mean(jnp.concatenate(recall).astype(jnp.float32)))
