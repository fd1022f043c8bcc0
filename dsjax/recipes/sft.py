"""Supervised fine-tuning on prompt rows with a ``completion``: the "sft" recipe.

Each row is the rendered prompt (V3.1 chat template, :mod:`dsjax.recipes.grpo_data`) followed by
its completion and the EOS token, right-padded to ``config.seq_len``; the loss is the pre-training
loss (:func:`dsjax.recipes.pretrain.pretraining_loss`) with the loss mask on the completion's
tokens only. The rows of step s are positions ``s * batch_size ...`` of a per-epoch shuffled order
(:func:`dsjax.recipes.grpo_data.row_order`), so the data position is the step itself.

The GRPO recipe runs it first, as its supervised phase (``grpo.sft_steps``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from dsjax.recipes import pretrain
from dsjax.recipes.grpo_data import PromptSet, load_prompt_sets, row_order
from dsjax.train.config import get
from dsjax.train.loop import TrainResult, train
from dsjax.train.recipe import Recipe

__all__ = ["supervised_rows", "SupervisedBatches", "recipe", "run"]


def supervised_rows(prompts: PromptSet, indices: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Rows ``indices`` of ``prompts`` as a pre-training batch (tokens, targets, segment_ids,
    loss_mask; [len(indices), seq_len]) whose loss counts the completion and its EOS only."""
    shape = (len(indices), seq_len)
    batch = dict(tokens=np.zeros(shape, np.int32), targets=np.zeros(shape, np.int32),
                 segment_ids=np.zeros(shape, np.int32), loss_mask=np.zeros(shape, np.float32))
    for row, index in enumerate(indices):
        prompt, completion = prompts.prompt_ids[index], prompts.completion_ids[index]
        if completion is None:
            raise ValueError(f"prompt row {index} has no 'completion' to learn from")
        ids = np.asarray(prompt + completion, np.int32)
        if len(ids) - 1 > seq_len:
            raise ValueError(f"prompt row {index} needs {len(ids) - 1} positions, more than config.seq_len={seq_len}")
        length = len(ids) - 1
        batch["tokens"][row, :length] = ids[:-1]
        batch["targets"][row, :length] = ids[1:]
        batch["segment_ids"][row, :length] = 1
        batch["loss_mask"][row, len(prompt) - 1:length] = 1.0
    return batch


class SupervisedBatches:
    """This process's rows of each step; the position is ``state["step"]`` (nothing else to save)."""

    def __init__(self, prompts: PromptSet, *, batch_size: int, seq_len: int, seed: int, process_index: int,
                 process_count: int):
        self.prompts, self.seq_len, self.seed = prompts, seq_len, seed
        self.rows = batch_size // process_count
        self.offset = process_index * self.rows
        self.batch_size = batch_size

    def next(self, state: dict) -> Optional[dict]:
        start = int(state["step"]) * self.batch_size + self.offset
        return supervised_rows(self.prompts, row_order(len(self.prompts), self.seed, start, self.rows), self.seq_len)

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state


def recipe(config: Any) -> Recipe:
    """The SFT recipe: ``config.prompts``'s training rows, the pre-training loss on their completions."""
    train_set, _ = load_prompt_sets(config)

    def batches(config, process_index, process_count):
        return SupervisedBatches(train_set, batch_size=int(get(config, "batch_size")), seq_len=int(get(config, "seq_len")),
                                 seed=int(get(config, "seed")), process_index=process_index,
                                 process_count=process_count)

    return dataclasses.replace(pretrain.recipe(config), batches=batches)


def run(config: Any, workdir: str, **kwargs) -> TrainResult:
    """Fine-tunes (or resumes) with ``config`` in ``workdir`` (``kwargs``: see :func:`dsjax.train.loop.train`)."""
    return train(config, workdir, recipe(config), **kwargs)
