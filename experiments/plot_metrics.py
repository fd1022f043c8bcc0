"""Plot metrics of a run's metrics.jsonl against the step, as a PNG (needs the `plots` extra:
`pip install -e ".[plots]"`).

    python experiments/plot_metrics.py /tmp/grpo_quickstart --keys reward_mean,eval_accuracy \
        --out docs/grpo_quickstart.png

Each key is one line over the logged steps that carry it. `--before WORKDIR/sft` prepends another
run's entries (e.g. the supervised phase), at steps counted back from its last checkpoint (0).
"""

from __future__ import annotations

import argparse
import os
import sys

# Run as a script from anywhere: make the repository root importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from dsjax.checkpoint import CHECKPOINTS_SUBDIR, complete_steps  # noqa: E402
from dsjax.train.metrics import read_metrics  # noqa: E402


def series(entries: list[dict], key: str, offset: int = 0) -> tuple[list[int], list[float]]:
    """(steps, values) of the entries that carry ``key``, steps shifted by ``offset``."""
    picked = [(e["step"] + offset, e[key]) for e in entries if key in e]
    return [s for s, _ in picked], [v for _, v in picked]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--keys", default="loss", help="comma-separated metric names")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--before", default="", help="a run whose entries come first (steps <= 0)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)

    import matplotlib  # noqa: PLC0415 (an optional dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    entries = read_metrics(args.workdir)
    if not entries:
        raise SystemExit(f"error: no metrics in {os.path.join(args.workdir, 'metrics.jsonl')}")
    earlier = read_metrics(args.before) if args.before else []
    # The earlier run ends at its last checkpoint (its last steps may not be logged).
    saved = complete_steps(os.path.join(args.before, CHECKPOINTS_SUBDIR)) if args.before else []
    offset = -max(saved or [e["step"] for e in earlier] or [0])
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for key in args.keys.split(","):
        before_steps, before_values = series(earlier, key, offset)
        steps, values = series(entries, key)
        if not steps and not before_steps:
            raise SystemExit(f"error: no entry of {args.workdir} has the metric {key!r}")
        axes.plot(before_steps + steps, before_values + values, marker="." if len(steps) < 40 else None, label=key)
    if earlier:
        axes.axvline(0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel("step" + (" (supervised phase before 0)" if earlier else ""))
    axes.set_title(args.title or args.workdir)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
