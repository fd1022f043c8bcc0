"""Mixed RL in one stage (V3.2 report, section 3): math and code prompts, each domain with its own
rewards and KL weight, on the quickstart's tiny V3-family model on CPU.

    python -m experiments.train --config configs/grpo_mixed.py --workdir /tmp/grpo_mixed

Prompts come from the generated "mixed" task: additions (math, non-thinking) and one-line Python
functions checked by asserts in the sandbox (code, thinking mode). To train on files instead, write
them with `python -m dsjax.recipes.grpo_data --task mixed --out DIR` (or bring your own rows, see
`dsjax.data.prompts`) and pass `--config.prompts.task= --config.prompts.train=DIR/train.jsonl
--config.prompts.eval=DIR/eval.jsonl`.

Rewards: the exact sum (math), the share of asserts passed (code), and a small format reward
(thinking structure, closed answer) for both. KL to the reference policy: none for math (the
report finds weak or no KL best there), 0.01 for code. Each rollout batch is trained on twice, in
two mini-batches, so the clip and the off-policy mask (delta 0.5) come into play. A fixed-length
supervised phase on the rows' completions comes first.
"""

from configs import grpo_quickstart


def get_config():
    config = grpo_quickstart.get_config()
    config.prompts.task = "mixed"
    config.prompts.task_options.update(dict(train_size=1000, eval_size=64, code_fraction=0.5))

    grpo = config.grpo
    grpo.rewards = dict(
        math=dict(function="math_answer", weight=1.0, domains="math"),
        code=dict(function="code_tests", weight=1.0, domains="code", options=dict(timeout_s=2.0)),
        format=dict(function="format_reward", weight=0.1, domains="math,code"),
    )
    grpo.kl_coef = 0.01
    grpo.kl_coef_by_domain.math = 0.0
    grpo.num_samples = 4
    grpo.num_iterations = 2
    grpo.max_new_tokens = 64
    grpo.top_p = 0.95
    grpo.off_policy_delta = 0.5
    grpo.sft_steps = 300
    grpo.sft_target_accuracy = 0.0  # all 300 steps

    config.seq_len = 128  # the supervised rows: a prompt of up to 63 tokens and a completion of up to 64
    config.batch_size = 32  # two mini-batches per rollout batch (16 prompts x 4 samples)
    config.num_steps = 60
    config.checkpoint_every = 20
    return config
