"""Reinforcement learning pieces that need no model: the GRPO objective, rewards and a code sandbox."""

from __future__ import annotations

from dsjax.rl.objective import (AGGREGATIONS, RATIO_LEVELS, group_advantages, grpo_loss, off_policy_sequence_mask,
                                sequence_log_ratio)
from dsjax.rl.rewards import REWARD_FACTORIES, REWARDS, get_reward
from dsjax.rl.sandbox import SandboxResult, check_code, run_python

__all__ = ["AGGREGATIONS", "RATIO_LEVELS", "group_advantages", "grpo_loss", "off_policy_sequence_mask",
           "sequence_log_ratio", "REWARD_FACTORIES", "REWARDS", "get_reward", "SandboxResult", "check_code",
           "run_python"]
