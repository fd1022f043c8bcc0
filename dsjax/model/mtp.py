"""Multi-token prediction (DeepSeek-V3 report section 2.2).

Module k (0-based, `mtp_k`) at position i combines the previous depth's hidden state h_i^{k-1}
(h^{-1}: the main model's last decoder output, before its final norm) with the embedding of token
t_{i+k+1}, runs one decoder layer and predicts t_{i+k+2} through the shared output head:

    h'_i = W_eh [RMSNorm_e(Emb(t_{i+k+1})) ; RMSNorm_h(h_i^{k-1})]      (embedding half first)
    h_i^k = DecoderLayer(h'_i)
    logits = Head(RMSNorm_head(h_i^k))

(The V3 report numbers modules from 1: its module k is `mtp_{k-1}` here.)

The embedding and output head are the main model's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.model.norms import RMSNorm
from dsjax.model.params import Linear


class MTPModule(nn.Module):
    config: object
    layer_cls: type  # the decoder layer class (the model file passes its own)
    dsa_stage: str | None = None

    @nn.compact
    def __call__(self, hidden: jax.Array, next_embeddings: jax.Array, forced_indices, cos, sin, segment_ids):
        """Returns (h^k before the head norm, head-normalised h^k, the layer's aux)."""
        c = self.config
        norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        joined = jnp.concatenate([RMSNorm(name="embed_norm", **norm)(next_embeddings),
                                  RMSNorm(name="hidden_norm", **norm)(hidden)], axis=-1)
        x = Linear((c.hidden_size,), ("concat_embed", "embed"), name="eh_proj", dtype=c.dtype,
                   param_dtype=c.param_dtype, init_std=c.initializer_range)(joined)
        layer = self.layer_cls(c, use_moe=True, dsa_stage=self.dsa_stage, name="layer")
        h, (aux, _) = layer(x, forced_indices, cos, sin, segment_ids)
        return h, RMSNorm(name="head_norm", **norm)(h), aux
