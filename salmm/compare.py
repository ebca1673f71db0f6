"""``salmm compare`` (``python -m salmm.compare``): every checkpoint and baseline on every
prepared split, one markdown/CSV/JSON table in the paper's column order.

Each cell is an evaluation (:func:`salmm.evaluation.evaluator.evaluate`) in its own folder; a cell
whose summary already matches its inputs and options is reused (see
:mod:`salmm.evaluation.comparison`).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.commandline import (
    module_main,
    module_parse_args,
    non_negative_int,
    positive_int,
)
from pipeline.core.cpu import usable_cores
from salmm.evaluation.options import BASELINES, CompareOptions

SUMMARY = ("Evaluate every checkpoint and baseline on every prepared split; one markdown/CSV/JSON"
           " table in the paper's column order.")
CONFIG_FILE = True  # --config FILE / --print-config (pipeline.core.configfile)


def options(args: argparse.Namespace) -> CompareOptions:
    return CompareOptions(prepared=tuple(args.prepared), out=args.out,
                          checkpoint=tuple(args.checkpoint), baseline=tuple(args.baseline),
                          split=args.split, cached_clip=args.cached_clip, seeds=args.seeds,
                          seed=args.seed, bootstrap=args.bootstrap, workers=args.workers,
                          device=args.device)


parse_args = module_parse_args(__name__, options)
main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The comparison's options."""
    parser.add_argument("--checkpoint", action="append", default=[], metavar="CKPT",
                        help="a salmm train checkpoint or an official model_best_*.tar"
                             " (repeatable)")
    parser.add_argument("--baseline", action="append", default=[], choices=BASELINES,
                        help="a reference predictor row (repeatable)")
    parser.add_argument("--prepared", action="append", required=True, metavar="PREPARED",
                        help="a prepared dataset (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the table (results.md, results.csv, results.json) and"
                             " one evaluation folder per cell")
    parser.add_argument("--split", default="test", help="split to score in every dataset")
    parser.add_argument("--cached-clip", action="store_true",
                        help="checkpoints take CLIP embeddings from each dataset's cache")
    parser.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                        help="AUC_B and AUC_J as mean ± std over N seeds")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seeds the metrics' random draws, per frame")
    parser.add_argument("--bootstrap", type=non_negative_int, default=0, metavar="N",
                        help="95%% bootstrap intervals over videos (N replicates)")
    parser.add_argument("--workers", type=non_negative_int, default=usable_cores(),
                        help="processes scoring frames")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the best available)")


def run(args: argparse.Namespace) -> None:
    from salmm.evaluation.comparison import compare  # lazy: torch loads after the options

    compare(options(args))


if __name__ == "__main__":
    sys.exit(main())
