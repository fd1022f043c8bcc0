"""HF `config.json` <-> dsjax model config."""

from __future__ import annotations

import json
import os

import ml_collections

from dsjax.model.config import make_config

_SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32")

# dsjax field <- HF field, for fields that are a plain rename (or the same name).
_RENAMES = dict(
    vocab_size="vocab_size",
    hidden_size="hidden_size",
    num_layers="num_hidden_layers",
    dense_intermediate_size="intermediate_size",
    num_heads="num_attention_heads",
    q_lora_rank="q_lora_rank",
    kv_lora_rank="kv_lora_rank",
    qk_nope_head_dim="qk_nope_head_dim",
    qk_rope_head_dim="qk_rope_head_dim",
    v_head_dim="v_head_dim",
    num_routed_experts="n_routed_experts",
    num_experts_per_token="num_experts_per_tok",
    num_shared_experts="n_shared_experts",
    moe_intermediate_size="moe_intermediate_size",
    routed_scaling_factor="routed_scaling_factor",
    norm_topk_prob="norm_topk_prob",
    rms_norm_eps="rms_norm_eps",
    max_position_embeddings="max_position_embeddings",
    index_num_heads="index_n_heads",
    index_head_dim="index_head_dim",
    index_topk="index_topk",
    tie_word_embeddings="tie_word_embeddings",
    initializer_range="initializer_range",
)


class UnsupportedConfigError(ValueError):
    pass


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json (is {directory!r} an HF checkpoint directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def from_hf(hf: dict, source: str = "config.json", **overrides) -> ml_collections.ConfigDict:
    """Map an HF DeepSeek-V3/V3.2 config dict onto a dsjax model config."""

    def fail(message):
        raise UnsupportedConfigError(f"{source}: {message}")

    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        fail(f"model_type={model_type!r} is not one of {_SUPPORTED_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={hf['hidden_act']!r}: DeepSeek-V3.x experts are SwiGLU (silu)")
    if hf.get("attention_bias", False):
        fail("attention_bias=true: DeepSeek-V3.x attention has no biases")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        fail(f"scoring_func={hf['scoring_func']!r}: only the sigmoid router of V3.x is supported")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        fail(f"topk_method={hf['topk_method']!r}: only noaux_tc routing is supported")

    fields = {ours: hf[theirs] for ours, theirs in _RENAMES.items() if theirs in hf}
    fields["num_expert_groups"] = hf.get("n_group") or 1
    fields["num_selected_groups"] = hf.get("topk_group") or 1
    fields["num_dense_layers"] = _num_dense_layers(hf, fail)
    fields["num_mtp_layers"] = int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)
    fields["mla_rope_interleave"] = bool(hf.get("rope_interleave", True))
    fields["use_indexer"] = model_type == "deepseek_v32" or "index_topk" in hf
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope
    fields["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("default", None):
        fields["rope_scaling"] = None
    elif rope_type == "yarn":
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor")
        fields["rope_scaling"] = {k: scaling[k] for k in keys if scaling.get(k) is not None}
    else:
        fail(f"rope type {rope_type!r} is not supported (DeepSeek-V3.x uses yarn)")
    if hf.get("dtype") in ("bfloat16", "float32") and "param_dtype" not in overrides:
        fields["param_dtype"] = hf["dtype"]
    fields.update(overrides)
    return make_config(fields)


def _num_dense_layers(hf: dict, fail) -> int:
    kinds = hf.get("mlp_layer_types")
    if kinds is None:
        return int(hf.get("first_k_dense_replace", 0) or 0)
    dense = kinds.count("dense")
    if kinds != ["dense"] * dense + ["sparse"] * (len(kinds) - dense):
        fail(f"mlp_layer_types={kinds}: dsjax needs the dense layers first, then the MoE layers")
    return dense


def to_hf(config) -> dict:
    """An HF config.json dict for a dsjax model config (loadable by transformers)."""
    hf = {theirs: config[ours] for ours, theirs in _RENAMES.items()}
    v32 = bool(config.use_indexer)
    hf.update(
        architectures=["DeepseekV32ForCausalLM" if v32 else "DeepseekV3ForCausalLM"],
        model_type="deepseek_v32" if v32 else "deepseek_v3",
        first_k_dense_replace=config.num_dense_layers,
        n_group=config.num_expert_groups,
        topk_group=config.num_selected_groups,
        num_nextn_predict_layers=config.num_mtp_layers,
        num_key_value_heads=config.num_heads,
        hidden_act="silu",
        attention_bias=False,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        dtype=config.param_dtype,
    )
    if not v32:
        hf["rope_interleave"] = bool(config.mla_rope_interleave)
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            hf.pop(key)
    rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        rope.update(dict(config.rope_scaling), rope_type="yarn")
    hf["rope_parameters"] = rope
    return hf
