"""Benchmarks: each script measures a fast path against its baseline side by side and prints
the ratio. Run from the repository root as ``python -m bench.<name> [options]``."""
