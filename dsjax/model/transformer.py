"""The DeepSeek-V3.x language model: embedding, scanned decoder layers, output head, MTP.

    h = Emb(tokens)
    for each layer:  h += MLA(RMSNorm(h));  h += FFN(RMSNorm(h))    FFN: dense SwiGLU, then MoE
    logits = RMSNorm(h) W_head

The first `num_dense_layers` layers and the MoE layers are two stacks of identical layers
whose parameters carry a leading `layers` axis; each stack runs under `nn.scan`, so compile
time does not grow with depth. Params are a plain pytree; `forward` below is a pure function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsjax import parallel
from dsjax.model.cache import Cache, stack_sizes
from dsjax.model.dsa import check_dsa_stage
from dsjax.model.mla import MLA
from dsjax.model.moe import MLP, MoE
from dsjax.model.mtp import MTPModule
from dsjax.model.norms import RMSNorm
from dsjax.model.params import Kernel, contract
from dsjax.model.rope import rope_tables


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32
    mtp_logits: jax.Array | None  # [num_mtp_layers, B, T, vocab]: module k at i predicts token i + k + 2
    # Per layer stack / MTP module ("dense_layers", "moe_layers", "mtp_0", ...; stacks: one value per
    # layer on a leading axis). Router-holding entries: expert_load, balance_loss, expert_indices.
    # In the DSA stages "warmup" / "sparse", every entry with indexer layers also has indexer_kl and
    # topk_attention_recall (float32 scalars per layer).
    aux: dict
    hidden: jax.Array  # [B, T, D], the last decoder layer's output before the final norm
    cache: Cache | None = None  # the updated cache, when one was passed in


class DecoderLayer(nn.Module):
    config: Any
    use_moe: bool
    dsa_stage: str | None = None  # see dsjax.model.dsa

    @nn.compact
    def __call__(self, h, forced_indices, cos, sin, segment_ids, cache=None, cache_segments=None, cache_index=None):
        """-> (h, (aux, cache)): the router's statistics (MoE layers) and the indexer's (DSA stages),
        and the layer's updated cache (see `MLA`; None without one)."""
        c = self.config
        norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        attention = MLA(c, dsa_stage=self.dsa_stage, name="attention")
        attended, aux, cache = attention(RMSNorm(name="attention_norm", **norm)(h), cos, sin, segment_ids,
                                         cache, cache_segments, cache_index)
        h = h + attended
        x = RMSNorm(name="mlp_norm", **norm)(h)
        if self.use_moe:
            y, routing_aux = MoE(c, name="mlp")(x, segment_ids > 0, forced_indices)
            aux = {**routing_aux, **aux}
        else:
            y = MLP(c.dense_intermediate_size, c, name="mlp")(x)
        return h + y, (aux, cache)


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_stack(config, num_layers: int, use_moe: bool, dsa_stage, name: str):
    layer = DecoderLayer
    if config.remat_policy != "none":
        layer = nn.remat(layer, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=False)
    scanned = nn.scan(
        layer,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, use_moe=use_moe, dsa_stage=dsa_stage, name=name)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its document: restarts at 0 where the segment id changes."""
    length = segment_ids.shape[-1]
    index = jnp.arange(length)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], -1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return (index - start_index).astype(jnp.int32)


class Transformer(nn.Module):
    config: Any  # a FrozenConfigDict (hashable, as Flax module fields must be)
    dsa_stage: str | None = None  # None, "dense", "warmup" or "sparse" (see dsjax.model.dsa)

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, forced_routing=None, cache: Cache | None = None,
                 last_only: bool = False) -> ModelOutput:
        c = self.config
        forced_routing = forced_routing or {}
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        cos, sin = rope_tables(positions, c)

        embedding = Kernel((c.vocab_size, c.hidden_size), ("vocab", "embed"), init_std=c.initializer_range,
                           param_dtype=c.param_dtype, param_name="embedding", name="embed")()
        embed = lambda ids: jnp.take(embedding, ids, axis=0).astype(c.dtype)  # noqa: E731
        h = embed(tokens)

        cache_segments = cache_index = None
        if cache is not None:  # the new tokens take the next columns
            cache_index = cache.index
            cache_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                                 cache_index, axis=1)
        aux, layer_caches = {}, {}
        for name, count in stack_sizes(c).items():
            if count:
                stack = _layer_stack(c, count, name == "moe_layers", self.dsa_stage, name)
                layer_cache = None if cache is None else cache.layers[name]
                h, (layer_aux, layer_caches[name]) = stack(h, forced_routing.get(name), cos, sin, segment_ids,
                                                           layer_cache, cache_segments, cache_index)
                if layer_aux:
                    aux[name] = layer_aux

        final_norm = RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="final_norm")
        if c.tie_word_embeddings:
            head = embedding.T
        else:
            head = Kernel((c.hidden_size, c.vocab_size), ("embed", "vocab"), init_std=c.initializer_range,
                          param_dtype=c.param_dtype, name="lm_head")()
        output_head = lambda x: contract(x, head, 1, c.dtype, preferred=jnp.float32)  # noqa: E731
        logits = output_head(final_norm(h[:, -1:] if last_only else h))
        if cache is not None:  # generation: no MTP (its predictions are not sampled)
            new_cache = Cache(layer_caches, cache_segments, cache_index + tokens.shape[1])
            return ModelOutput(logits, None, aux, h, new_cache)

        mtp_logits = []
        previous = h
        for k in range(c.num_mtp_layers):
            # Module k at position i reads token i + k + 1 (and predicts i + k + 2); the wrapped tail
            # is masked by the loss.
            next_embeddings = embed(jnp.roll(tokens, -(k + 1), axis=1))
            name = f"mtp_{k}"
            previous, normed, aux[name] = MTPModule(c, DecoderLayer, dsa_stage=self.dsa_stage, name=name)(
                previous, next_embeddings, forced_routing.get(name), cos, sin, segment_ids)
            mtp_logits.append(output_head(normed))
        return ModelOutput(logits, jnp.stack(mtp_logits) if mtp_logits else None, aux, h)


def frozen(config) -> ml_collections.FrozenConfigDict:
    return config if isinstance(config, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(config)


def build(config, dsa_stage: str | None = None) -> Transformer:
    check_dsa_stage(dsa_stage)
    return Transformer(frozen(config), dsa_stage=dsa_stage)


def init_params(config, rng: jax.Array, *, sequence_length: int = 8) -> dict:
    """Random parameters (a plain dict of arrays, no partitioning boxes)."""
    init = jax.jit(lambda key: nn.unbox(_init_boxed(config, key, sequence_length))["params"])
    return init(rng)


def _init_boxed(config, rng, sequence_length):
    return build(config).init(rng, jnp.zeros((1, sequence_length), jnp.int32))


def abstract_params(config, *, boxed: bool = False):
    """Shapes and dtypes of every parameter without allocating them (jax.eval_shape)."""
    variables = jax.eval_shape(lambda rng: _init_boxed(config, rng, 2), jax.random.key(0))
    return variables["params"] if boxed else nn.unbox(variables)["params"]


def logical_axes(config) -> dict:
    """A pytree like params whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(abstract_params(config, boxed=True))


def param_shardings(config, mesh, rules=None, *, like=None):
    """NamedShardings for every parameter on `mesh` (`dsjax.parallel` rules over the logical axes).

    like: a params-like pytree that may differ from the model (e.g. a checkpoint's): its leaves
    that the model has (same path and shape) get the model's sharding, the others are replicated.
    """
    shapes = abstract_params(config)
    shardings = parallel.param_shardings(shapes, logical_axes(config), mesh, rules)
    return shardings if like is None else parallel.shardings_for(like, shapes, shardings, mesh)


def init_sharded_params(config, mesh, rng: jax.Array, rules=None) -> dict:
    """Random parameters created directly in their shards: no host ever holds the whole model."""
    with jax.set_mesh(mesh):
        return jax.jit(lambda key: init_params(config, key), out_shardings=param_shardings(config, mesh, rules))(rng)


def forward(params, tokens, config, *, segment_ids=None, positions=None, forced_routing=None,
            dsa_stage: str | None = None, cache: Cache | None = None, last_only: bool = False) -> ModelOutput:
    """The pure forward pass: (params, int tokens [B, T]) -> ModelOutput. One body for training,
    scoring, prefill and decode.

    segment_ids [B, T] (default: one document; 0 marks padding), positions [B, T] (default:
    restarting at each document), forced_routing {aux key: int [.., B, T, k]} (replayed experts),
    dsa_stage: None, "dense", "warmup" or "sparse" (static; see dsjax.model.dsa).
    cache: a `dsjax.model.cache.Cache` (`init_cache`): the tokens are written into its next T columns
    and attend to every cached column (pass their positions); the output carries the updated cache
    and no MTP logits. last_only: logits of the last position only (prefill).
    """
    return build(config, dsa_stage).apply({"params": params}, tokens, segment_ids, positions, forced_routing, cache,
                                          last_only)
