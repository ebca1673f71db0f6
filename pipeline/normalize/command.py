"""``python -m pipeline normalize``: its options and what it runs."""

from __future__ import annotations

import argparse
import logging

from pipeline.core.commandline import parse_size
from pipeline.datasets import DATASETS
from pipeline.formats.shards import DEFAULT_FRAME_CODEC, FRAME_CODECS
from pipeline.normalize.settings import (
    DECODES,
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_SHARD_SIZE,
    DEFAULT_SIZE,
    Options,
)

log = logging.getLogger("pipeline.normalize")
SUMMARY = "Turn a raw dataset into deterministic WebDataset shards + a versioned manifest."
LOGGER = "pipeline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipeline normalize``."""
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="raw dataset root (holds train.json, ...)")
    parser.add_argument("--out", required=True,
                        help="prepared folder: a local path or an fsspec URL")
    parser.add_argument("--size", default=DEFAULT_SIZE,
                        help=f"prepared frame size WIDTHxHEIGHT (default {DEFAULT_SIZE})")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"split entries per shard (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--decode", "--profile", dest="decode", choices=DECODES,
                        default="faithful",
                        help="how frames and gaze maps are decoded: faithful, in full as the"
                             " published loader (default); fast, reduced-scale JPEG decoding"
                             " (recorded, changes the version); --profile is its older name")
    parser.add_argument("--frame-codec", choices=sorted(FRAME_CODECS),
                        default=DEFAULT_FRAME_CODEC,
                        help="how frames are stored: png, lossless, exactly the published"
                             " loader's pixels (default); jpeg95, about 4x smaller, a few grey"
                             " levels off (recorded, changes the version)")
    parser.add_argument("--ground-truth", choices=("saliency_fix", "saliency"),
                        help="dreyeve: the gaze maps the labels are made from, saliency_fix"
                             " (default; the TPAMI ground truth) or saliency (recorded,"
                             " changes the version)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int,
                       help="local Dask worker processes (default: one per usable core)")
    where.add_argument("--dask-address", help="use the Dask scheduler at tcp://HOST:PORT")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad frames (listed in the manifest) instead of failing")
    parser.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                        help="with --skip-bad, fail if more than this fraction of frames is bad"
                             f" (default {DEFAULT_MAX_BAD_FRACTION})")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard prepared output of other options or inputs in --out")


def run(args: argparse.Namespace) -> int:
    """``python -m pipeline normalize``: exit code (the version id is logged at the end)."""
    from pipeline.normalize.job import (  # lazy: Dask loads after the options
        check_options,
        normalize,
        resolve_ground_truth,
    )

    try:
        options = Options(parse_size(args.size), args.shard_size, args.decode,
                          args.frame_codec, resolve_ground_truth(args.dataset, args.ground_truth))
        check_options(args.dataset, options)
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        if not 0 <= args.max_bad_fraction <= 1:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    except ValueError as err:
        log.error("normalize: %s", err)
        return 2
    normalize(args.dataset, args.root, args.out, size=options.size,
              shard_size=options.shard_size, decode=options.decode,
              frame_codec=options.frame_codec, ground_truth=options.ground_truth,
              workers=args.workers,
              dask_address=args.dask_address, skip_bad=args.skip_bad,
              max_bad_fraction=args.max_bad_fraction, overwrite=args.overwrite)
    return 0
