"""DSA stage 1, the dense warm-up (V3.2 report, section 2.1): attention stays dense, every
parameter but the lightning indexers is frozen, and each indexer learns
KL(p[t,:] || softmax(I[t,:])), p being the main attention's probabilities summed over heads and
L1-normalised. `indexer_kl` and `topk_attention_recall` are logged to metrics.jsonl.

    python -m experiments.train --config configs/dsa_warmup.py --workdir /tmp/dsa_warmup \
        [--config.init_from=DIR]     # an HF V3.2 checkpoint, a converted one, or a dsjax run

Without `init_from` (the CPU default) a tiny V3.2 model is first pre-trained densely for
`dsa.dense_pretrain_steps` steps in WORKDIR/dense_pretrain, so the attention being distilled
is not uniform. For a real model, set `--config.model=hf --config.init_from=/path/to/ckpt` and
the paper's scale: lr 1e-3, 1000 steps of 16 x 128K tokens.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model("tiny_v32", **base.TINY_DIMS, **base.TINY_INDEXER)
    config.recipe = "dsa"
    config.dsa.stage = "warmup"
    config.dsa.dense_pretrain_steps = 150
    config.seq_len = 128
    config.batch_size = 8
    config.num_steps = 80
    config.log_every = 10
    config.checkpoint_every = 40
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 10
    config.optimizer.decay_steps = config.num_steps
    config.router_bias_update_rate = 1e-2  # used by the dense phase; frozen in the warm-up
    return config
