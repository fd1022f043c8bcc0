"""Prompt rows for post-training (SFT, GRPO): JSON-lines files with one prompt per line.

A row is a JSON object with

* ``prompt`` (a string: the user's message) or ``messages`` (a chat: a list of ``{"role",
  "content"}`` objects), exactly one of the two;
* ``domain``: a non-empty string ("math", "code", ...), which picks the rewards and the KL weight;
* ``thinking`` (optional bool, default false): render the prompt in thinking mode;
* ``completion`` (optional string): a reference answer, what a supervised phase learns;
* any other columns the rewards read (``answer``, ``tests``, ...), passed through unchanged.

    rows = read_prompt_rows("data/train*.jsonl")      # [{"prompt": ..., "domain": ..., ...}, ...]

A bad row stops the read with one line naming the file and line: ``train.jsonl:12: no 'domain'``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dsjax.data.sources import expand_paths

__all__ = ["ROLES", "check_prompt_row", "read_prompt_rows", "prompt_messages"]

ROLES = ("system", "user", "assistant", "tool")


def check_prompt_row(row: Any, where: str) -> dict:
    """``row`` as a plain dict after checking the keys above; ValueError ``"<where>: <why>"`` if bad."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: {why}")

    if not isinstance(row, Mapping):
        raise bad(f"expected a JSON object, got {type(row).__name__}")
    row = dict(row)
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        raise bad("needs exactly one of 'prompt' (a string) and 'messages' (a list of {role, content})")
    if has_prompt and not (isinstance(row["prompt"], str) and row["prompt"].strip()):
        raise bad("'prompt' must be a non-empty string")
    if has_messages:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of {role, content} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or message.get("role") not in ROLES:
                raise bad(f"messages[{i}] needs a 'role' in {ROLES}")
            if not isinstance(message.get("content", ""), (str, type(None))):
                raise bad(f"messages[{i}]: 'content' must be a string")
        if messages[-1]["role"] != "user":
            raise bad("the last message must be the user's (the model answers it)")
    domain = row.get("domain")
    if not (isinstance(domain, str) and domain):
        raise bad("needs a 'domain' (a non-empty string, e.g. \"math\")")
    if not isinstance(row.setdefault("thinking", False), bool):
        raise bad(f"'thinking' must be true or false, got {row['thinking']!r}")
    if "completion" in row and not isinstance(row["completion"], str):
        raise bad("'completion' must be a string")
    return row


def read_prompt_rows(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """Every non-blank line of the JSONL files ``paths`` matches (globs, comma-separated), checked,
    in file order (the files sorted by name)."""
    rows = []
    for path in expand_paths(paths, what="prompt files"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                rows.append(check_prompt_row(obj, where))
    if not rows:
        raise ValueError(f"no prompt rows in {paths!r}")
    return rows


def prompt_messages(row: Mapping) -> list[dict]:
    """The chat a row asks the model to continue: its ``messages``, or one user turn of ``prompt``."""
    if "messages" in row:
        return [dict(m) for m in row["messages"]]
    return [{"role": "user", "content": row["prompt"]}]
