"""The one mapping between official HF tensor names and dsjax parameter paths.

A dsjax leaf such as `moe_layers/mlp/experts/gate_proj/kernel` [L, E, D, F] is assembled from
L x E HF tensors `model.layers.{l}.mlp.experts.{e}.gate_proj.weight` [F, D]. `leaf_maps(config)`
lists, for every parameter of a config, the HF names of its slices and how a slice converts:
HF linears are `[out, in]` matrices, dsjax kernels `[*in, *out]` with structured dims.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsjax.model.transformer import abstract_params
from dsjax.tree import dict_paths

# Relative to `model.layers.{i}.`; `{expert}` is filled per routed expert.
LAYER_NAMES = {
    ("attention_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
    ("attention", "q_proj", "kernel"): "self_attn.q_proj.weight",
    ("attention", "q_a_proj", "kernel"): "self_attn.q_a_proj.weight",
    ("attention", "q_a_norm", "scale"): "self_attn.q_a_layernorm.weight",
    ("attention", "q_b_proj", "kernel"): "self_attn.q_b_proj.weight",
    ("attention", "kv_a_proj", "kernel"): "self_attn.kv_a_proj_with_mqa.weight",
    ("attention", "kv_a_norm", "scale"): "self_attn.kv_a_layernorm.weight",
    ("attention", "kv_b_proj", "kernel"): "self_attn.kv_b_proj.weight",
    ("attention", "o_proj", "kernel"): "self_attn.o_proj.weight",
    ("attention", "indexer", "wq_b", "kernel"): "self_attn.indexer.wq_b.weight",
    ("attention", "indexer", "wk", "kernel"): "self_attn.indexer.wk.weight",
    ("attention", "indexer", "k_norm", "scale"): "self_attn.indexer.k_norm.weight",
    ("attention", "indexer", "k_norm", "bias"): "self_attn.indexer.k_norm.bias",
    ("attention", "indexer", "weights_proj", "kernel"): "self_attn.indexer.weights_proj.weight",
    ("mlp", "gate_proj", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up_proj", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down_proj", "kernel"): "mlp.down_proj.weight",
    ("mlp", "router", "kernel"): "mlp.gate.weight",
    ("mlp", "router", "e_score_correction_bias"): "mlp.gate.e_score_correction_bias",
    ("mlp", "shared_experts", "gate_proj", "kernel"): "mlp.shared_experts.gate_proj.weight",
    ("mlp", "shared_experts", "up_proj", "kernel"): "mlp.shared_experts.up_proj.weight",
    ("mlp", "shared_experts", "down_proj", "kernel"): "mlp.shared_experts.down_proj.weight",
    ("mlp", "experts", "gate_proj", "kernel"): "mlp.experts.{expert}.gate_proj.weight",
    ("mlp", "experts", "up_proj", "kernel"): "mlp.experts.{expert}.up_proj.weight",
    ("mlp", "experts", "down_proj", "kernel"): "mlp.experts.{expert}.down_proj.weight",
}
TOP_NAMES = {
    ("embed", "embedding"): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head", "kernel"): "lm_head.weight",
}
# Relative to `model.layers.{num_layers + k}.` for MTP module k.
MTP_NAMES = {
    ("embed_norm", "scale"): "enorm.weight",
    ("hidden_norm", "scale"): "hnorm.weight",
    ("eh_proj", "kernel"): "eh_proj.weight",
    ("head_norm", "scale"): "shared_head.norm.weight",
}
# The released checkpoints repeat the shared embedding and head inside each MTP layer.
MTP_SHARED_COPIES = {"embed_tokens.weight": ("embed", "embedding"), "shared_head.head.weight": ("lm_head", "kernel")}

# Kernels whose input side spans two dsjax dims (o_proj contracts [heads, v_head_dim]).
_TWO_INPUT_DIMS = {("attention", "o_proj", "kernel")}

# The Linears that the official FP8 checkpoints store as float8_e4m3fn with a 128x128-block
# `<name>_scale_inv` (relative to a decoder layer): attention, dense MLP, routed and shared experts,
# and the V3.2 indexer's wq_b / wk. Everything else (embeddings, lm_head, norms, the router
# `mlp.gate`, `indexer.weights_proj`, the MTP `eh_proj`) stays bf16/fp32.
FP8_LAYER_LEAVES = frozenset({
    ("attention", "q_proj", "kernel"),
    ("attention", "q_a_proj", "kernel"),
    ("attention", "q_b_proj", "kernel"),
    ("attention", "kv_a_proj", "kernel"),
    ("attention", "kv_b_proj", "kernel"),
    ("attention", "o_proj", "kernel"),
    ("attention", "indexer", "wq_b", "kernel"),
    ("attention", "indexer", "wk", "kernel"),
    ("mlp", "gate_proj", "kernel"),
    ("mlp", "up_proj", "kernel"),
    ("mlp", "down_proj", "kernel"),
    ("mlp", "shared_experts", "gate_proj", "kernel"),
    ("mlp", "shared_experts", "up_proj", "kernel"),
    ("mlp", "shared_experts", "down_proj", "kernel"),
    ("mlp", "experts", "gate_proj", "kernel"),
    ("mlp", "experts", "up_proj", "kernel"),
    ("mlp", "experts", "down_proj", "kernel"),
})


@dataclasses.dataclass(frozen=True)
class LeafMap:
    path: tuple[str, ...]  # dsjax param path
    hf_names: np.ndarray  # object array of HF names, shape = stack_shape
    slice_shape: tuple[int, ...]  # dsjax shape of one slice
    in_dims: int  # 0: same layout in both; n > 0: HF [out, in] <-> dsjax [*in (n dims), *out]
    fp8: bool = False  # the official FP8 checkpoints quantise this leaf's HF tensors (FP8_LAYER_LEAVES)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.hf_names.shape

    @property
    def stack_ndim(self) -> int:
        return len(self.stack_shape)

    @property
    def in_out_sizes(self) -> tuple[int, int]:
        """A kernel slice as the 2-D matrix [in, out] (the transpose of the HF [out, in] tensor)."""
        in_shape, out_shape = self.slice_shape[:self.in_dims], self.slice_shape[self.in_dims:]
        return int(np.prod(in_shape)), int(np.prod(out_shape))

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.in_dims == 0:
            return self.slice_shape
        in_shape, out_shape = self.slice_shape[:self.in_dims], self.slice_shape[self.in_dims:]
        return (int(np.prod(out_shape)), int(np.prod(in_shape)))

    def to_dsjax(self, hf_tensor: np.ndarray) -> np.ndarray:
        if self.in_dims == 0:
            return hf_tensor.reshape(self.slice_shape)
        in_shape, out_shape = self.slice_shape[:self.in_dims], self.slice_shape[self.in_dims:]
        return hf_tensor.T.reshape(*in_shape, *out_shape)

    def to_hf(self, dsjax_slice: np.ndarray) -> np.ndarray:
        if self.in_dims == 0:
            return dsjax_slice.reshape(self.hf_shape)
        out_size, in_size = self.hf_shape
        return np.ascontiguousarray(dsjax_slice.reshape(in_size, out_size).T)


def leaf_maps(config) -> list[LeafMap]:
    """A LeafMap for every parameter of `config`, in a deterministic (layer-major) order."""
    maps = []
    for path, leaf in dict_paths(abstract_params(config)):
        shape = tuple(leaf.shape)
        group = path[0]
        if group in ("dense_layers", "moe_layers"):
            rel = path[1:]
            first = 0 if group == "dense_layers" else config.num_dense_layers
            template = _lookup(LAYER_NAMES, rel, path)
            layers = range(first, first + shape[0])
            if "{expert}" in template:
                names = [[f"model.layers.{i}." + template.format(expert=e) for e in range(shape[1])] for i in layers]
                slice_shape = shape[2:]
            else:
                names = [f"model.layers.{i}." + template for i in layers]
                slice_shape = shape[1:]
        elif group.startswith("mtp_"):
            layer = config.num_layers + int(group.split("_")[1])
            rel = path[1:]
            if rel[0] == "layer":
                rel = rel[1:]
                template = _lookup(LAYER_NAMES, rel, path)
            else:
                template = _lookup(MTP_NAMES, rel, path)
            if "{expert}" in template:
                names = [f"model.layers.{layer}." + template.format(expert=e) for e in range(shape[0])]
                slice_shape = shape[1:]
            else:
                names = f"model.layers.{layer}." + template
                slice_shape = shape
        else:
            rel = path
            names = _lookup(TOP_NAMES, path, path)
            slice_shape = shape
        in_dims = 0 if rel[-1] != "kernel" else (2 if rel in _TWO_INPUT_DIMS else 1)
        # Decoder-layer Linears only (MTP_NAMES' eh_proj and TOP_NAMES are never in the set).
        maps.append(LeafMap(path, np.array(names, dtype=object), slice_shape, in_dims, fp8=rel in FP8_LAYER_LEAVES))
    return maps


def mtp_shared_copy_names(config) -> dict[str, tuple[str, ...]]:
    """HF names of the MTP layers' copies of the embedding and head -> the dsjax path they copy."""
    return {f"model.layers.{config.num_layers + k}.{suffix}": target
            for k in range(config.num_mtp_layers) for suffix, target in MTP_SHARED_COPIES.items()}


def _lookup(table, rel, full_path):
    try:
        return table[rel]
    except KeyError:
        raise KeyError(f"no HF name is known for dsjax parameter {'/'.join(full_path)}") from None
