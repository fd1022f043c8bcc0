"""Quickstart: a tiny V3-family model (MLA + DeepSeekMoE + one MTP module) learning the Python
standard library's source, byte by byte, on CPU in about three minutes.

    python -m experiments.train --config configs/quickstart.py --workdir /tmp/quickstart
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model(
        "tiny_v3",
        hidden_size=96,
        num_layers=3,  # one dense layer, two MoE layers
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
    config.seq_len = 128
    config.batch_size = 8
    config.num_steps = 400
    config.log_every = 25
    config.checkpoint_every = 100
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 40
    config.optimizer.decay_steps = config.num_steps
    # V3 used gamma = 1e-3 over hundreds of thousands of steps; a few hundred steps at a high
    # learning rate need a faster bias update to keep the experts balanced.
    config.router_bias_update_rate = 1e-2
    return config
