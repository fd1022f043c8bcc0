"""DSA kernels (DeepSeek Sparse Attention, V3.2): each module holds a pure-JAX reference and a
Pallas kernel, chosen with `impl=` ("xla" | "pallas" | "pallas_gpu" | "pallas_tpu" | "auto",
see `dsjax.kernels._backend`).

- `indexer_topk`: lightning-indexer scores + top-k key indices, blockwise over keys.
- `sparse_mla`: MLA in MQA form over per-query selected latent rows, O(T K), custom VJP.
- `attention_target` / `attention_target_at` / `attention_lse`: head-averaged attention
  probabilities, the indexer's KL target (dense warm-up / sparse stage).
- `visibility`: the causal, same-segment rule every attention (kernel or not) applies.
"""

from dsjax.kernels._backend import visibility
from dsjax.kernels.attention_target import attention_lse, attention_target, attention_target_at
from dsjax.kernels.indexer_topk import indexer_topk, indexer_topk_reference
from dsjax.kernels.sparse_mla import sparse_mla, sparse_mla_reference

__all__ = [
    "attention_lse",
    "attention_target",
    "attention_target_at",
    "indexer_topk",
    "indexer_topk_reference",
    "sparse_mla",
    "sparse_mla_reference",
    "visibility",
]
