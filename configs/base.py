"""Shared defaults of every training config: `configs/NAME.py` files start from `get_config()`.

A config is a ConfigDict; see `dsjax.train.config.default_train_config` for what each key means,
and `dsjax.recipes` for the recipes `config.recipe` names.
"""

import ml_collections

from dsjax.model.config import make_config
from dsjax.train.config import default_train_config


# The CPU-sized model of the quickstart and the DSA stage configs: 3 layers (one dense, two MoE),
# one MTP module; with `tiny_v32` a 4-head lightning indexer picking 16 of up to 128 keys.
TINY_DIMS = dict(
    hidden_size=96,
    num_layers=3,
    num_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    dense_intermediate_size=192,
    moe_intermediate_size=48,
    num_mtp_layers=1,
    max_position_embeddings=512,
)
TINY_INDEXER = dict(index_num_heads=4, index_head_dim=16, index_topk=16)


def model(preset: str, **overrides) -> ml_collections.ConfigDict:
    """All fields of a model preset plus overrides, as a ConfigDict.

    A full ConfigDict (rather than the preset's name) lets the command line set any field:
    `--config.model.num_layers=4`.
    """
    return make_config(preset, **overrides)


def get_config() -> ml_collections.ConfigDict:
    config = default_train_config()
    # V3 pre-training values (reference section 9) are already the optimizer defaults:
    # AdamW(0.9, 0.95), weight decay 0.1, clip 1.0, warm-up then cosine decay to 10%.
    config.optimizer.warmup_steps = 100
    config.optimizer.decay_steps = config.num_steps
    return config
