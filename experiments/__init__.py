"""Command-line entry points (`python -m experiments.train --config configs/NAME.py ...`)."""
