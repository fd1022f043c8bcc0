"""The DeepSeek Sparse Attention training recipe (V3.2 report, section 2.1).

Two stages turn a dense-attention model into a DSA one; each is a config for the shared loop
(`configs/dsa_warmup.py`, `configs/dsa_sparse.py`) and differs from pre-training only in its loss
(:func:`dsjax.train.losses.pretraining_loss` with ``dsa_stage``) and trained leaves:

1. dense warm-up (``dsa.stage="warmup"``): attention stays dense, every parameter but the
   indexers is frozen, the loss is KL(p[t,:] || softmax(I[t,:]));
2. sparse training (``dsa.stage="sparse"``): attention over the indexer's top-k keys only, the
   model learns from the LM loss, the indexer (its input detached) from KL(p[t,S_t] || softmax(I[t,S_t])).

A stage normally starts from a checkpoint (``init_from``). From nothing, the indexer would learn
to imitate the nearly uniform attention of a random model, so :func:`train_stage` first runs
``dsa.dense_pretrain_steps`` steps of ordinary dense pre-training in ``WORKDIR/dense_pretrain``
and starts the stage from there.
"""

from __future__ import annotations

import os
from typing import Any

from dsjax.train import loop

DENSE_PRETRAIN_DIR = "dense_pretrain"


def dense_pretrain_config(config: Any) -> Any:
  """The config of the dense phase: the same model, data and optimizer, dense attention, LM loss,
  every parameter trained, ``dsa.dense_pretrain_steps`` steps."""
  dense = config.copy_and_resolve_references()
  with dense.unlocked():
    dense.dsa.stage = "dense"
    dense.num_steps = config.dsa.dense_pretrain_steps
    dense.optimizer.decay_steps = dense.num_steps
    dense.optimizer.warmup_steps = min(dense.optimizer.warmup_steps, max(dense.num_steps // 10, 1))
  return dense


def train_stage(config: Any, workdir: str, **kwargs) -> loop.TrainResult:
  """Runs ``config`` with :func:`dsjax.train.loop.train`, after the dense phase when one is due.

  The dense phase runs only when the stage starts from nothing: ``dsa.stage`` is "warmup" or
  "sparse", ``dsa.dense_pretrain_steps > 0``, ``init_from`` is empty and ``workdir`` holds no
  checkpoint yet. It is itself resumable, and the stage then starts from its last checkpoint.
  """
  print_fn = kwargs.get("print_fn", print)
  steps = int(config.dsa.dense_pretrain_steps)
  fresh = not config.init_from and loop.checkpoint_lib.complete_steps(os.path.join(workdir, "checkpoints")) == []
  if config.dsa.stage in ("warmup", "sparse") and steps > 0 and fresh:
    dense_dir = os.path.join(workdir, DENSE_PRETRAIN_DIR)
    if print_fn:
      print_fn(f"No init_from: {steps} steps of dense pre-training first, in {dense_dir}")
    loop.train(dense_pretrain_config(config), dense_dir, **kwargs)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.init_from = dense_dir
    if print_fn:
      print_fn(f"DSA {config.dsa.stage} stage from {dense_dir}")
  return loop.train(config, workdir, **kwargs)
