"""The latent KV cache that prefill and decode thread through the model.

Per layer and column only what MLA needs to attend in the absorbed form: the normalised KV latent
c_kv (kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim); V3.2 adds the lightning
indexer's key (index_head_dim). Nothing per head. Once for all layers, each column's segment id
(0: not written yet, or padding) and the next column to write.

Generation left-pads its rows, so every new token of a step goes to the same column in every row
and a decode step writes one column (`dynamic_update_slice`); positions restart at 0 at each row's
first real column, and padding is never attended to by real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.model.mla import LayerCache

STACKS = ("dense_layers", "moe_layers")


class Cache(NamedTuple):
    layers: dict  # {stack name: LayerCache with a leading layer axis}
    segment_ids: jax.Array  # [B, S] int32: each column's segment (0: not written yet, or padding)
    index: jax.Array  # int32 scalar: the next column to write


def stack_sizes(config) -> dict[str, int]:
    return {"dense_layers": config.num_dense_layers, "moe_layers": config.num_layers - config.num_dense_layers}


def init_cache(config, batch: int, length: int, dtype=None) -> Cache:
    """An empty cache for `length` columns per row. dtype: config.dtype."""
    dtype = jnp.dtype(dtype or config.dtype)
    layers = {}
    for name, count in stack_sizes(config).items():
        if count:
            kv = jnp.zeros((count, batch, length, config.kv_lora_rank + config.qk_rope_head_dim), dtype)
            index_keys = (jnp.zeros((count, batch, length, config.index_head_dim), dtype)
                          if config.use_indexer else None)
            layers[name] = LayerCache(kv, index_keys)
    return Cache(layers, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))


def cache_bytes_per_token(config, dtype="bfloat16") -> dict[str, int]:
    """Bytes of cache one token needs over all decoder layers (MTP modules not included).

    latent: MLA's [c_kv | k_rope]; indexer: V3.2's index keys; total: the layers' part of what
    `init_cache` stores (plus one int32 segment id per column for all layers); uncompressed: a
    conventional cache of per-head K (qk_nope + qk_rope) and V (v_head_dim).
    """
    size = jnp.dtype(dtype).itemsize
    layers = config.num_layers
    latent = layers * (config.kv_lora_rank + config.qk_rope_head_dim) * size
    indexer = layers * config.index_head_dim * size if config.use_indexer else 0
    per_head = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    uncompressed = layers * config.num_heads * per_head * size
    return dict(latent=latent, indexer=indexer, total=latent + indexer, uncompressed=uncompressed)
