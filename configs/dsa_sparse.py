"""DSA stage 2, sparse training (V3.2 report, section 2.1): every query attends only to the
`index_topk` keys its lightning indexer selects (O(L k) attention, `model.attention_impl`
"xla" or "pallas"); the model learns from the LM loss, and the indexer, its input detached,
from KL(p[t,S_t] || softmax(I[t,S_t])) over the selected keys. `indexer_kl` and
`topk_attention_recall` are logged to metrics.jsonl.

    python -m experiments.train --config configs/dsa_sparse.py --workdir /tmp/dsa_sparse \
        --config.init_from=/tmp/dsa_warmup        # normally the warm-up's result

Without `init_from`, a tiny V3.2 model is first pre-trained densely (`dsa.dense_pretrain_steps`).
The paper's scale: lr 7.3e-6, 15000 steps of 480 x 128K tokens, index_topk 2048.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model("tiny_v32", **base.TINY_DIMS, **base.TINY_INDEXER)
    config.recipe = "dsa"
    config.dsa.stage = "sparse"
    config.dsa.dense_pretrain_steps = 150
    config.seq_len = 128
    config.batch_size = 8
    config.num_steps = 200
    config.log_every = 20
    config.checkpoint_every = 100
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 10
    config.optimizer.decay_steps = config.num_steps
    config.router_bias_update_rate = 1e-2
    return config
