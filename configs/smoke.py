"""Smoke test: the smallest V3-family model (MLA, one dense and one MoE layer, one MTP module)
for a few steps on the stdlib corpus; seconds on a CPU. The tests run it.

    python -m experiments.train --config configs/smoke.py --workdir /tmp/smoke
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model("tiny_v3", hidden_size=32, num_layers=2, num_mtp_layers=1,
                              dense_intermediate_size=48, moe_intermediate_size=16)
    config.seq_len = 32
    config.batch_size = 4
    config.num_steps = 20
    config.log_every = 5
    config.checkpoint_every = 10
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 5
    config.optimizer.decay_steps = config.num_steps
    config.data.read_threads = 1
    return config
