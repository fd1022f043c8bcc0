"""Mixed RL in one stage (V3.2 report, section 3): math and code prompts, each domain with its own
rewards and KL weight, on a tiny V3-family model on CPU.

    python -m experiments.train --config configs/grpo_mixed.py --workdir /tmp/grpo_mixed

Prompts come from the generated "mixed" task: additions (math, non-thinking) and one-line Python
functions checked by asserts in the sandbox (code, thinking mode). To train on files instead, write
them with `python -m dsjax.recipes.grpo_data --task mixed --out DIR` (or bring your own rows, see
`dsjax.data.prompts`) and pass `--config.prompts.task= --config.prompts.train=DIR/train.jsonl
--config.prompts.eval=DIR/eval.jsonl`.

Rewards: the exact sum (math), the share of asserts passed (code), and a small format reward
(thinking structure, closed answer) for both. KL to the reference policy: none for math (the
report finds weak or no KL best there), 0.01 for code. A short supervised phase on the rows'
completions comes first, as in the quickstart.
"""

from configs import base
from dsjax.recipes.grpo import default_grpo_config
from dsjax.recipes.grpo_data import default_prompts_config


def get_config():
    config = base.get_config()
    config.model = base.model("tiny_v3", **dict(base.TINY_DIMS, num_mtp_layers=0), moe_impl="dense")
    config.recipe = "grpo"
    config.prompts = default_prompts_config()
    config.prompts.task = "mixed"
    config.prompts.task_options.update(dict(digits=2, train_size=1000, eval_size=64, seed=0, code_fraction=0.5))

    config.grpo = default_grpo_config()
    grpo = config.grpo
    grpo.rewards.math = dict(function="math_answer", weight=1.0, domains="math")
    grpo.rewards.code = dict(function="code_tests", weight=1.0, domains="code", options=dict(timeout_s=2.0))
    grpo.rewards.format = dict(function="format_reward", weight=0.1, domains="math,code")
    grpo.kl_coef = 0.01
    grpo.kl_coef_by_domain.math = 0.0
    grpo.num_samples = 4
    grpo.prompts_per_rollout = 16
    grpo.num_iterations = 2
    grpo.max_new_tokens = 64
    grpo.temperature = 1.0
    grpo.top_p = 0.95
    grpo.off_policy_delta = 0.5
    grpo.eval_every = 10
    grpo.sft_steps = 300
    grpo.sft_batch_size = 32

    config.seq_len = 128  # the supervised rows: a prompt of up to 63 tokens and a completion of up to 64
    config.batch_size = 32  # two mini-batches per rollout batch (16 prompts x 4 samples), two passes
    config.num_steps = 60
    config.log_every = 10
    config.checkpoint_every = 20
    config.optimizer.learning_rate = 3e-4
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 5
    config.optimizer.decay_steps = config.num_steps
    config.router_bias_update_rate = 1e-2  # the supervised phase's
    config.data.tokenizer = "byte"
    return config
