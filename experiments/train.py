"""Train (or resume training) a dsjax model from a config file.

    python -m experiments.train --config configs/quickstart.py --workdir /tmp/quickstart \
        [--config.num_steps=500 --config.optimizer.learning_rate=1e-3 ...]

Running the same command again with the same --workdir resumes from the newest checkpoint in
WORKDIR/checkpoints (a larger --config.num_steps continues training past the saved step).

A bad command line, config file or config value is one `error: ...` line on stderr and exit status 2
(`--verbose`: the traceback instead); a run stopped by a NaN/Inf loss is one `error: ...` line and
status 1; anything else is a bug and raises with its traceback (status 1). See dsjax/cli.py.
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

from dsjax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a configs/NAME.py with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events.")
# Not absl's -v/--verbosity (log level): this one is about how errors are reported.
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print the full traceback instead of one "
                             "'error: ...' line (the exit status is the same).")


def run(config, workdir: str):
    """Train with a ConfigDict (what `main` does after parsing the flags): the recipe
    `config.recipe` names, on the shared loop."""
    from dsjax import recipes  # imported late: flag parsing stays fast

    return recipes.run(config, workdir)


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; keep the console to the progress lines.
        logging.set_verbosity(logging.WARNING)
    from dsjax.train.loop import NonFiniteError

    def train():
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        run(_CONFIG.value, _WORKDIR.value)

    # Bad input: exit status 2. A NaN/Inf loss is no bad input but an expected way for a run to
    # stop: one line too, exit status 1 (as a crash would give).
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    return cli.run_main(train, verbose=_VERBOSE.value, where=config_file,
                        errors=cli.BAD_INPUT_ERRORS + (app.UsageError,), failures=(NonFiniteError,))


def parse_flags(argv: list[str]) -> list[str]:
    """app.run's flags parser: a bad flag, config override or config file is one `error:` line, status 2."""
    return cli.parse_absl_flags(argv, config_flag="config")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
