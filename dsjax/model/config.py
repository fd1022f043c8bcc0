"""Model configuration: one `ml_collections.ConfigDict` per model, plus the named presets.

Field names say what a thing is; `dsjax.hf.config` maps HF `config.json` names onto them.
The numbers of the released 671B models come from their HF `config.json` files.
"""

from __future__ import annotations

import ml_collections

# Every field a model config has, with its default. A preset overrides some of them.
_DEFAULTS = dict(
    vocab_size=129280,
    hidden_size=7168,
    num_layers=61,  # decoder layers of the main model (MTP modules not included)
    num_dense_layers=3,  # the first layers use a dense SwiGLU MLP (HF: first_k_dense_replace)
    dense_intermediate_size=18432,  # HF: intermediate_size
    num_heads=128,
    q_lora_rank=1536,  # None: queries are projected directly from the hidden state
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    mla_rope_interleave=True,  # MLA's rope dims come in interleaved pairs (HF: rope_interleave)
    # DeepSeekMoE
    num_routed_experts=256,
    num_experts_per_token=8,
    num_shared_experts=1,
    moe_intermediate_size=2048,
    num_expert_groups=8,  # HF: n_group
    num_selected_groups=4,  # HF: topk_group
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    # norms and positions
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    # YaRN: None, or a dict with factor, original_max_position_embeddings, beta_fast,
    # beta_slow, mscale, mscale_all_dim.
    rope_scaling=dict(
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
    max_position_embeddings=163840,
    # multi-token prediction modules (HF: num_nextn_predict_layers)
    num_mtp_layers=1,
    # DeepSeek Sparse Attention (V3.2): the lightning indexer picks `index_topk` keys per query.
    use_indexer=False,
    index_num_heads=64,
    index_head_dim=128,
    index_topk=2048,
    tie_word_embeddings=False,
    # numerics and implementation choices
    dtype="float32",  # compute dtype of activations and matmuls ("bfloat16" on accelerators)
    param_dtype="float32",  # storage dtype of parameters
    # DSA kernels of the indexer layers (V3.2; V3 layers always run dense XLA attention):
    # "xla": gather-based pure JAX, O(T k) (what CPU runs); "pallas": the Pallas kernels
    # (Triton on GPU, Mosaic on TPU, interpret mode on CPU). See dsjax/kernels.
    attention_impl="xla",
    moe_impl="ragged",  # "ragged": sorted tokens + jax.lax.ragged_dot (dropless); "dense": every expert on every token (tests)
    # Under a mesh with an `expert` axis > 1, routed experts run expert-parallel (all-to-all).
    # 0: dropless; f > 0: each device accepts at most f x (its tokens x k / expert shards) copies.
    expert_capacity_factor=0.0,
    remat_policy="none",  # "none", "full" or "dots" (save matmul outputs only)
    initializer_range=0.02,
)

_V3_671B = {}  # the defaults are the released V3 model

_PRESETS: dict[str, dict] = {
    "v3_671b": _V3_671B,
    # V3.1 keeps V3's architecture; only the weights and chat template changed.
    "v31_671b": _V3_671B,
    "v32_671b": dict(use_indexer=True),
    # Tiny models for CPU tests: sizes deliberately not multiples of 8, q LoRA on,
    # n_group > topk_group > 1, YaRN with factor > 1, index_topk below the test lengths.
    "tiny_v3": dict(
        vocab_size=259,
        hidden_size=52,
        num_layers=3,
        num_dense_layers=1,
        dense_intermediate_size=76,
        num_heads=3,
        q_lora_rank=22,
        kv_lora_rank=18,
        qk_nope_head_dim=10,
        qk_rope_head_dim=6,
        v_head_dim=14,
        num_routed_experts=12,
        num_experts_per_token=3,
        num_shared_experts=1,
        moe_intermediate_size=26,
        num_expert_groups=4,
        num_selected_groups=2,
        rope_scaling=dict(
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=256,
        num_mtp_layers=1,
    ),
    # ~190M parameters (~60M active): the size the benchmarks use.
    "small_v32": dict(
        vocab_size=32000,
        hidden_size=512,
        num_layers=8,
        num_dense_layers=1,
        dense_intermediate_size=1408,
        num_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        num_routed_experts=32,
        num_experts_per_token=4,
        num_shared_experts=1,
        moe_intermediate_size=352,
        num_expert_groups=4,
        num_selected_groups=2,
        rope_scaling=dict(
            factor=16.0,
            original_max_position_embeddings=2048,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=32768,
        num_mtp_layers=1,
        use_indexer=True,
        index_num_heads=8,
        index_head_dim=64,
        index_topk=256,
    ),
}
_PRESETS["tiny_v32"] = dict(
    _PRESETS["tiny_v3"],
    use_indexer=True,
    index_num_heads=5,
    index_head_dim=12,  # > qk_rope_head_dim: the indexer has rope and non-rope dims
    index_topk=7,
)


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def make_config(name_or_config: str | ml_collections.ConfigDict | dict | None = None, **overrides) -> ml_collections.ConfigDict:
    """A validated model config: a preset name, a (partial) dict/ConfigDict, plus overrides."""
    fields = dict(_DEFAULTS)
    if isinstance(name_or_config, str):
        if name_or_config not in _PRESETS:
            raise ValueError(f"unknown model preset {name_or_config!r}; known presets: {', '.join(preset_names())}")
        fields.update(_PRESETS[name_or_config])
    elif name_or_config is not None:
        given = name_or_config.to_dict() if isinstance(name_or_config, ml_collections.ConfigDict) else dict(name_or_config)
        unknown = sorted(set(given) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        fields.update(given)
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model config field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(_DEFAULTS))}")
    fields.update(overrides)
    if fields["rope_scaling"] is not None:
        fields["rope_scaling"] = dict(fields["rope_scaling"])
    config = ml_collections.ConfigDict(fields)
    validate(config)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field when a config cannot describe a working model."""

    def need(cond: bool, message: str):
        if not cond:
            raise ValueError(f"invalid model config: {message}")

    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "dense_intermediate_size"):
        need(int(config[key]) > 0, f"{key} must be positive, got {config[key]}")
    need(0 <= config.num_dense_layers <= config.num_layers,
         f"num_dense_layers={config.num_dense_layers} must be in [0, num_layers={config.num_layers}]")
    need(config.q_lora_rank is None or config.q_lora_rank > 0, "q_lora_rank must be None or positive")
    need(config.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={config.qk_rope_head_dim} must be even")
    if config.num_layers > config.num_dense_layers or config.num_mtp_layers > 0:
        need(config.num_routed_experts > 0, "num_routed_experts must be positive")
        need(0 < config.num_experts_per_token <= config.num_routed_experts,
             f"num_experts_per_token={config.num_experts_per_token} must be in [1, num_routed_experts]")
        need(config.num_routed_experts % config.num_expert_groups == 0,
             f"num_routed_experts={config.num_routed_experts} must be divisible by num_expert_groups={config.num_expert_groups}")
        need(1 <= config.num_selected_groups <= config.num_expert_groups,
             f"num_selected_groups={config.num_selected_groups} must be in [1, num_expert_groups={config.num_expert_groups}]")
        experts_per_group = config.num_routed_experts // config.num_expert_groups
        need(config.num_expert_groups == 1 or experts_per_group >= 2,
             "group-limited routing scores a group by its top-2 experts: need >= 2 experts per group")
        need(config.num_experts_per_token <= config.num_selected_groups * experts_per_group,
             "num_experts_per_token exceeds the experts in the selected groups")
    need(config.num_mtp_layers >= 0, "num_mtp_layers must be >= 0")
    if config.use_indexer:
        need(config.q_lora_rank is not None, "the V3.2 indexer reads the query LoRA latent: use_indexer needs q_lora_rank")
        need(config.index_head_dim >= config.qk_rope_head_dim,
             f"index_head_dim={config.index_head_dim} must be >= qk_rope_head_dim={config.qk_rope_head_dim}")
        need(config.index_topk > 0 and config.index_num_heads > 0, "index_topk and index_num_heads must be positive")
    if config.rope_scaling is not None:
        missing = {"factor", "original_max_position_embeddings"} - set(config.rope_scaling)
        need(not missing, f"rope_scaling lacks {sorted(missing)}")
    need(config.dtype in ("float32", "bfloat16", "float16"), f"dtype={config.dtype!r} must be float32, bfloat16 or float16")
    need(config.param_dtype in ("float32", "bfloat16"), f"param_dtype={config.param_dtype!r} must be float32 or bfloat16")
    need(config.attention_impl in ("xla", "pallas"),
         f"attention_impl={config.attention_impl!r} must be 'xla' (gather-based pure JAX) or 'pallas' "
         "(the Pallas kernels of dsjax.kernels; interpret mode on CPU)")
    need(config.moe_impl in ("ragged", "dense"), f"moe_impl={config.moe_impl!r} must be 'ragged' or 'dense'")
    need(config.remat_policy in ("none", "full", "dots"), f"remat_policy={config.remat_policy!r} must be none, full or dots")
