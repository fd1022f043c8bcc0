"""Prompt sets of the SFT and GRPO recipes: rows from JSONL files or a generated toy task, their
order, and their rendering with the DeepSeek-V3.1 chat template.

``config.prompts`` (:func:`default_prompts_config`) says where the rows come from:

    train / eval     JSONL globs of prompt rows (:mod:`dsjax.data.prompts` describes a row)
    task             or a generated task: "addition" (math) or "mixed" (math and code), with
    task_options     digits, train_size, eval_size, seed (and code_fraction for "mixed")

Rows are rendered with :func:`dsjax.inference.chat.encode_chat` (thinking mode per row) and
tokenised with ``config.data.tokenizer``. A row's ``completion`` (SFT target) is the text that
follows the rendered prompt, then the EOS token. ``python -m dsjax.recipes.grpo_data --task
mixed --out DIR`` writes a generated task as JSONL files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from dsjax.data import make_tokenizer
from dsjax.data.prompts import check_prompt_row, prompt_messages, read_prompt_rows
from dsjax.inference import chat
from dsjax.train.config import as_dict, get

__all__ = ["TASKS", "default_prompts_config", "PromptSet", "load_prompt_sets", "row_order", "addition_rows",
           "mixed_rows"]


def default_prompts_config() -> ml_collections.ConfigDict:
    """The ``prompts`` section of an SFT or GRPO config (see the module docstring)."""
    return ml_collections.ConfigDict(dict(
        train="", eval="", task="",
        task_options=ml_collections.ConfigDict(dict(digits=2, train_size=2000, eval_size=200, seed=0,
                                                    code_fraction=0.5)),
    ))


# ----------------------------------------------------------------------------------------------
# Generated tasks
# ----------------------------------------------------------------------------------------------


def _distinct_pairs(digits: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct (a, b) pairs of ``digits``-digit numbers, [count, 2]."""
    low, high = 10 ** (digits - 1), 10 ** digits
    span = high - low
    if count > span * span:
        raise ValueError(f"task_options asks for {count} distinct {digits}-digit additions; there are {span * span}")
    flat = rng.choice(span * span, size=count, replace=False)
    return np.stack([flat // span, flat % span], axis=1) + low


def addition_rows(count: int, *, digits: int = 2, seed: int = 0) -> list[dict]:
    """``count`` distinct additions "a+b=" (math domain); answer and completion are the sum."""
    pairs = _distinct_pairs(digits, count, np.random.default_rng(seed))
    return [dict(prompt=f"{a}+{b}=", domain="math", answer=str(a + b), completion=str(a + b)) for a, b in pairs]


# Code prompts: "Write f(x) returning x <op> k"; the tests call it on a few inputs.
_CODE_OPERATIONS = {"+": lambda x, k: x + k, "-": lambda x, k: x - k, "*": lambda x, k: x * k}


def _code_row(op: str, k: int) -> dict:
    """A thinking-mode code row: short reasoning, then the function in a ```python block."""
    tests = "\n".join(f"assert f({x}) == {_CODE_OPERATIONS[op](x, k)}" for x in (0, 3, 11))
    return dict(prompt=f"Write f(x) returning x{op}{k}.", domain="code", tests=tests, thinking=True,
                completion=f"f is x{op}{k}.</think>```python\ndef f(x):\n    return x{op}{k}\n```")


def mixed_rows(count: int, *, digits: int = 2, seed: int = 0, code_fraction: float = 0.5) -> list[dict]:
    """Math rows (additions, non-thinking) and code rows (tiny Python functions checked by asserts,
    thinking mode), shuffled."""
    rng = np.random.default_rng(seed)
    num_code = int(round(count * code_fraction))
    code = [_code_row(op, k) for op in _CODE_OPERATIONS for k in range(1, 1000)]
    if num_code > len(code):
        raise ValueError(f"task_options asks for {num_code} distinct code rows; there are {len(code)}")
    rows = addition_rows(count - num_code, digits=digits, seed=seed)
    rows += [code[i] for i in rng.choice(len(code), size=num_code, replace=False)]
    return [rows[i] for i in rng.permutation(len(rows))]


TASKS: dict[str, Callable[..., list[dict]]] = {"addition": addition_rows, "mixed": mixed_rows}


def _task_rows(name: str, options: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a generated task: one draw of distinct rows, split."""
    if name not in TASKS:
        raise ValueError(f"config.prompts.task={name!r}: must be one of {sorted(TASKS)} (or '' with prompts.train)")
    options = dict(default_prompts_config().task_options.to_dict(), **options)
    train_size, eval_size = int(options.pop("train_size")), int(options.pop("eval_size"))
    if name == "addition":
        options.pop("code_fraction")
    rows = TASKS[name](train_size + eval_size, **options)
    return rows[eval_size:], rows[:eval_size]


# ----------------------------------------------------------------------------------------------
# Rendered prompt sets
# ----------------------------------------------------------------------------------------------


class PromptSet:
    """Rows and their rendered token ids (``prompt_ids[i]``; ``completion_ids[i]`` ends with the EOS
    and is None for rows without a ``completion``)."""

    def __init__(self, rows: Sequence[dict], tokenizer: Any):
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.prompt_ids = [chat.encode_chat(tokenizer, prompt_messages(row), thinking=row["thinking"])
                           for row in self.rows]
        self.completion_ids = [tokenizer.encode(row["completion"]) + [tokenizer.eos_id] if "completion" in row
                               else None for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def max_prompt_length(self) -> int:
        return max(len(ids) for ids in self.prompt_ids)

    def text(self, ids: Sequence[int]) -> str:
        """Generated ids as text, chat markers kept (what the rewards read)."""
        return chat.decode_with_markers(self.tokenizer, ids)


def load_prompt_sets(config: Any) -> tuple[PromptSet, PromptSet | None]:
    """(train, eval) prompt sets of ``config.prompts`` (eval None when there is none)."""
    section = as_dict(config.get("prompts"))
    tokenizer = make_tokenizer(as_dict(get(config, "data")).get("tokenizer", "byte"))
    if section.get("task"):
        if section.get("train") or section.get("eval"):
            raise ValueError("config.prompts: set either task or train/eval files, not both")
        train, evaluation = _task_rows(section["task"], as_dict(section.get("task_options")))
        train = [check_prompt_row(row, f"task {section['task']!r} row {i}") for i, row in enumerate(train)]
        evaluation = [check_prompt_row(row, f"task {section['task']!r} row {i}") for i, row in enumerate(evaluation)]
    elif section.get("train"):
        train = read_prompt_rows(section["train"])
        evaluation = read_prompt_rows(section["eval"]) if section.get("eval") else []
    else:
        raise ValueError("config.prompts: set prompts.train (JSONL files) or prompts.task (a generated task)")
    return PromptSet(train, tokenizer), (PromptSet(evaluation, tokenizer) if evaluation else None)


def row_order(num_rows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions ``start .. start + count - 1`` of an endless row order: a fresh permutation of the
    ``num_rows`` rows per epoch (from ``seed`` and the epoch), so any position is found directly."""
    positions = np.arange(start, start + count)
    epochs = positions // num_rows
    order = {int(e): np.random.default_rng([int(seed), int(e)]).permutation(num_rows) for e in np.unique(epochs)}
    return np.array([order[int(e)][p % num_rows] for e, p in zip(epochs, positions)], np.int64)


def main(argv: Sequence[str] | None = None) -> None:
    """Writes a generated task's rows as ``OUT/train.jsonl`` and ``OUT/eval.jsonl``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--out", required=True)
    for key, value in default_prompts_config().task_options.items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    task, out = args.pop("task"), args.pop("out")
    os.makedirs(out, exist_ok=True)
    for name, rows in zip(("train", "eval"), _task_rows(task, args)):
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
