"""Quickstart: a tiny V3.2-family model (MLA with DeepSeek Sparse Attention, DeepSeekMoE, one MTP
module) learning the Python standard library's source, byte by byte, on CPU in a few minutes.

Each query attends to only the 16 keys its lightning indexer picks (of up to 128). The model
learns from the LM loss; the indexer, its input detached, learns from its own loss: the KL from
the main attention's distribution over the picked keys (the DSA sparse stage, `dsa.stage`).

    python -m experiments.train --config configs/quickstart.py --workdir /tmp/quickstart
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model("tiny_v32", **base.TINY_DIMS, **base.TINY_INDEXER)
    config.recipe = "dsa"
    config.dsa.stage = "sparse"
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
