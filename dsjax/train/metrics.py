"""Training observability: routing statistics, console lines, metrics.jsonl, TensorBoard.

Files a run writes into its workdir:

* ``metrics.jsonl``: one JSON object per logged step (``step`` first, then every
  metric as a float). When a run resumes from step ``s``, entries with
  ``step > s`` (written by the interrupted run after its last checkpoint) are
  dropped, so the file never holds a step twice.
* ``tensorboard/``: tensorboardX event files with the same scalars (the writer
  is opened with ``purge_step = s + 1`` on resume, so TensorBoard hides the
  interrupted run's later points as well).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "expert_load_stats",
    "format_duration",
    "format_progress",
    "read_metrics",
    "truncate_metrics_file",
    "MetricsWriter",
    "Throughput",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def expert_load_stats(loads: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Balance of the routed load over all MoE layers.

    Args:
      loads: router subtree -> tokens per expert, ``[..., E]`` (leading axes are
        layers).

    Returns:
      ``expert_load_max_over_mean``: the largest ``max(load) / mean(load)`` of any
      layer; ``expert_load_min_over_mean``: the smallest ``min(load) /
      mean(load)``. Perfect balance gives 1 and 1. Empty ``loads``: both 1.
    """
    highs, lows = [], []
    for load in loads.values():
        rows = jnp.reshape(load.astype(jnp.float32), (-1, load.shape[-1]))
        mean = jnp.maximum(jnp.mean(rows, axis=-1), 1e-9)
        highs.append(jnp.max(rows, axis=-1) / mean)
        lows.append(jnp.min(rows, axis=-1) / mean)
    if not highs:
        one = jnp.ones((), jnp.float32)
        return dict(expert_load_max_over_mean=one, expert_load_min_over_mean=one)
    return dict(expert_load_max_over_mean=jnp.max(jnp.concatenate(highs)),
                expert_load_min_over_mean=jnp.min(jnp.concatenate(lows)))


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s'; 65 -> '1m05s'; 7.2 -> '7s'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _compact(x: float) -> str:
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def format_progress(step: int, num_steps: int, metrics: Mapping[str, float], eta_s: float) -> str:
    """One console line: step/total, the loss terms, grad norm, lr, throughput, ETA."""
    width = len(str(num_steps))
    parts = [f"step {step:>{width}}/{num_steps}"]
    for key, label in (("loss", "loss"), ("loss_avg", "avg"), ("lm_loss", "lm"), ("mtp_loss", "mtp"),
                       ("balance_loss", "bal"), ("indexer_kl", "indexer kl"),
                       ("topk_attention_recall", "top-k recall"), ("reward_mean", "reward"), ("kl", "kl"),
                       ("eval_accuracy", "eval acc")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.4f}")
    if "grad_norm" in metrics:
        parts.append(f"gnorm {metrics['grad_norm']:.3f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "expert_load_max_over_mean" in metrics:
        parts.append(f"load max/mean {metrics['expert_load_max_over_mean']:.2f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{_compact(metrics['tokens_per_s'])} tok/s")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def read_metrics(workdir: str) -> list[dict]:
    """The entries of ``WORKDIR/metrics.jsonl`` (skipping a torn last line)."""
    path = os.path.join(workdir, METRICS_FILE)
    entries = []
    if not os.path.exists(path):
        return entries
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed process
    return entries


def truncate_metrics_file(path: str, last_step: int) -> int:
    """Rewrites ``path`` keeping only entries with ``step <= last_step``; returns how many went."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if not stripped:
                continue
            try:
                entry = json.loads(stripped)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(entry.get("step", -1)) <= last_step:
                kept.append(stripped)
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class Throughput:
    """Tokens/s over each log interval and the ETA from the mean step time.

    The first step a process runs includes compilation, so time is counted from
    its end: neither figure includes compile time, except for a log interval
    that holds only that first step (then its own duration is all there is).
    """

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self._start = time.perf_counter()
        self._origin_time: Optional[float] = None  # end of this process's first step
        self._origin_step = 0
        self._first_duration = float("nan")
        self._first_tokens = 0
        self._last_log_time = self._start
        self._tokens_since_log = 0

    def step_done(self, step: int, tokens: int) -> None:
        now = time.perf_counter()
        if self._origin_time is None:
            self._origin_time, self._origin_step = now, step
            self._first_duration = now - self._start
            self._first_tokens = tokens
            self._last_log_time = now
            return
        self._tokens_since_log += tokens

    def log(self, step: int) -> tuple[float, float]:
        """(tokens per second since the previous log, ETA in seconds)."""
        now = time.perf_counter()
        if self._tokens_since_log:
            tokens_per_s = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
        else:
            tokens_per_s = self._first_tokens / max(self._first_duration, 1e-9)
        self._tokens_since_log = 0
        self._last_log_time = now
        if self._origin_time is not None and step > self._origin_step:
            mean_step = (now - self._origin_time) / (step - self._origin_step)
        else:
            mean_step = float("nan")  # only the compile step so far: no estimate yet
        return tokens_per_s, (self.num_steps - step) * mean_step


class MetricsWriter:
    """Appends logged steps to ``metrics.jsonl`` and TensorBoard; prints the console line.

    Args:
      workdir: run directory.
      resume_step: the step the run restarts from (0 for a fresh run): entries of
        an earlier run past it are removed from ``metrics.jsonl`` and purged from
        TensorBoard's view.
      tensorboard: write TensorBoard event files.
      print_fn: where console lines go (``print`` by default; None: nowhere).
      primary: only the primary process writes files.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True,
                 print_fn=print, primary: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self.print_fn = print_fn
        self.primary = primary
        self._tb = None
        self._file = None
        if not primary:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_metrics_file(self.path, resume_step)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
            kwargs = {"purge_step": resume_step + 1} if resume_step > 0 else {}
            self._tb = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR), **kwargs)

    def write(self, step: int, metrics: Mapping[str, Any], *, line: Optional[str] = None) -> None:
        values = {"step": int(step)}
        values.update({k: float(v) for k, v in metrics.items() if k != "step"})
        if self.primary and self._file is not None:
            self._file.write(json.dumps(values) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, global_step=int(step))
            self._tb.flush()
        if line is not None and self.print_fn is not None:
            self.print_fn(line)

    def message(self, text: str) -> None:
        if self.print_fn is not None:
            self.print_fn(text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
