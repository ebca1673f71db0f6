"""``python -m pipeline synth``: a small SYNTHETIC raw dataset in a real download layout (the
writers: :mod:`pipeline.datasets.synthetic`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import DATASETS
from pipeline.datasets.matfile import MAT_FORMATS
from pipeline.datasets.synthetic import DEFAULT_FRAMES, check_arguments, write_dataset

__all__ = ["add_arguments", "run", "write_dataset"]
log = logging.getLogger("pipeline.synth")
SUMMARY = "Write a small SYNTHETIC raw dataset in a real download layout (tests, demos)."
LOGGER = "pipeline"


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipeline synth``."""
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="download layout to imitate")
    parser.add_argument("--out", required=True, type=Path,
                        help="dataset root to create (must not exist, or be empty)")
    parser.add_argument("--videos", type=int, default=3,
                        help="number of videos (default 3: one each for train, valid, test)")
    parser.add_argument("--frames", type=int,
                        help="frames per video (default 8, or 22 for dreyeve; at least 6, 4 for"
                             " bdda, 17 for dreyeve)")
    parser.add_argument("--seed", type=int, default=0,
                        help="generator seed (same seed, same bytes)")
    parser.add_argument("--mat-format", choices=MAT_FORMATS, default="v5",
                        help="MATLAB format of the fixdata files (trafficgaze, drfixd-rainy)")


def run(args: argparse.Namespace) -> int:
    """``python -m pipeline synth``: write the dataset; exit code."""
    frames = DEFAULT_FRAMES.get(args.dataset, 8) if args.frames is None else args.frames
    try:
        check_arguments(args.dataset, args.videos, frames, args.mat_format)
    except ValueError as err:
        log.error("synth: %s", err)
        return 2
    write_dataset(args.dataset, args.out, videos=args.videos, frames=frames, seed=args.seed,
                  mat_format=args.mat_format)
    return 0
