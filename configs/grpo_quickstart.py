"""GRPO quickstart: a tiny V3-family model (MLA, DeepSeekMoE) learns 2-digit addition on CPU.

    python -m experiments.train --config configs/grpo_quickstart.py --workdir /tmp/grpo_quickstart

From nothing, a short supervised phase (WORKDIR/sft) teaches the answer format "a+b=" -> the sum
and EOS, stopped while the sums are still often wrong; GRPO then raises the greedy accuracy on
held-out additions with reward 1 for the exact sum (`math_answer`). Prompts use the V3.1 chat
template, non-thinking, over the byte tokenizer. Every `eval_every` steps `eval_accuracy` is the
greedy accuracy on 200 held-out additions.
"""

from configs import base
from dsjax.recipes.grpo import default_grpo_config
from dsjax.recipes.grpo_data import default_prompts_config


def get_config():
    config = base.get_config()
    # Dense expert compute (every expert on every token): faster than the ragged path on CPU.
    config.model = base.model("tiny_v3", **dict(base.TINY_DIMS, num_mtp_layers=0), moe_impl="dense")
    config.recipe = "grpo"
    config.prompts = default_prompts_config()
    config.prompts.task = "addition"
    config.prompts.task_options.update(dict(digits=2, train_size=3000, eval_size=200, seed=0))

    config.grpo = default_grpo_config()
    grpo = config.grpo
    grpo.rewards.exact_sum = dict(function="math_answer", weight=1.0, domains="math")
    grpo.num_samples = 8
    grpo.prompts_per_rollout = 16
    grpo.num_iterations = 1
    grpo.max_new_tokens = 4
    grpo.temperature = 1.0
    grpo.eval_every = 10
    grpo.sft_steps = 1000  # at most: the phase ends once the greedy eval accuracy reaches the target
    grpo.sft_target_accuracy = 0.4
    grpo.sft_eval_every = 25
    grpo.sft_batch_size = 32
    grpo.sft_learning_rate = 3e-3

    config.seq_len = 48  # the supervised rows: a 44-token prompt, the sum and EOS
    config.batch_size = 128  # one optimizer step per rollout batch (16 prompts x 8 samples)
    config.num_steps = 100
    config.log_every = 10
    config.checkpoint_every = 50
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 5
    config.optimizer.decay_steps = config.num_steps
    config.optimizer.schedule = "constant"
    config.router_bias_update_rate = 1e-2  # the supervised phase's
    config.data.tokenizer = "byte"
    return config
