"""Train (or resume training) a dsjax model from a config file.

    python -m experiments.train --config configs/quickstart.py --workdir /tmp/quickstart \
        [--config.num_steps=500 --config.optimizer.learning_rate=1e-3 ...]

Running the same command again with the same --workdir resumes from the newest checkpoint in
WORKDIR/checkpoints (a larger --config.num_steps continues training past the saved step).
"""

from __future__ import annotations

import os
import sys

# `configs/NAME.py` files import `configs.base`: make the repository root importable however
# this module was started.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a configs/NAME.py with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events.")


def run(config, workdir: str):
    """Train with a ConfigDict (what `main` does after parsing the flags)."""
    from dsjax.train.dsa import train_stage  # imported late: flag parsing stays fast

    # Every recipe runs the shared loop; DSA stages may run a dense pre-training phase first.
    return train_stage(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; keep the console to the progress lines.
        logging.set_verbosity(logging.WARNING)
    from dsjax.train.loop import NonFiniteError

    try:
        run(_CONFIG.value, _WORKDIR.value)
    except NonFiniteError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
