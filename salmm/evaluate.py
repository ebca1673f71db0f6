"""``salmm evaluate`` (``python -m salmm.evaluate``): score a checkpoint, or a baseline, on a
prepared split with the official metrics.

Outputs in ``--out``: ``per_frame.csv``, ``per_video.csv``, ``results.md`` (the paper's column
order), ``summary.json`` (written last); with ``--export-mat``, the files the authors' MATLAB loop
reads. The evaluation itself is :func:`salmm.evaluation.evaluator.evaluate`.
"""

from __future__ import annotations

import argparse
import functools
import sys

from pipeline.core.commandline import (
    module_main,
    module_parse_args,
    non_negative_int,
    positive_int,
)
from pipeline.core.cpu import usable_cores
from salmm.cli import (
    MODEL_OPTIONS_NOTE,
    add_model_options,
    check_cache_option,
    model_options,
)
from salmm.evaluation.options import BASELINES, EvalOptions

SUMMARY = ("Score a SalM2 checkpoint (or a baseline) on a prepared split with the official"
           " metrics (AUC_B, AUC_J, NSS, CC, SIM, KLD): per-frame and per-video CSV, summary"
           " JSON, markdown table, optionally .mat files for the official MATLAB scripts. "
           + MODEL_OPTIONS_NOTE)
CONFIG_FILE = True  # --config FILE / --print-config (pipeline.core.configfile)


options = functools.partial(model_options, EvalOptions)
parse_args = module_parse_args(__name__, options)
main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation's options."""
    add_model_options(parser, prepared=True, checkpoint_required=False)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--baseline", choices=BASELINES,
                       help="score a reference predictor instead of a checkpoint: center (a"
                            " centre Gaussian fitted on the train labels), mean (the mean train"
                            " label) or uniform")
    group.add_argument("--seeds", type=positive_int, default=EvalOptions.seeds, metavar="N",
                       help="score AUC_B and AUC_J under seeds --seed..--seed+N-1 and report"
                            " mean ± std (default 1: the single numbers)")
    group.add_argument("--bootstrap", type=non_negative_int, default=0, metavar="N",
                       help="95%% bootstrap intervals over videos from N replicates (default 0:"
                            " none)")
    group.add_argument("--split", default="test", help="split to score")
    group.add_argument("--out", required=True, metavar="DIR",
                       help="folder for per_frame.csv, results.md, summary.json")
    group.add_argument("--export-mat", metavar="DIR",
                       help="also write pre/ and tar/ .mat files and test.mat for MATLAB")
    group.add_argument("--batch-size", type=positive_int, default=EvalOptions.batch_size,
                       help="frames through the model at a time")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--workers", type=non_negative_int, default=usable_cores(),
                       help="processes scoring frames (0: score in this process; default: one"
                            " per usable core)")
    where.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                       help="score the frames on this Dask cluster (the one normalize used)")
    group.add_argument("--seed", type=non_negative_int, default=EvalOptions.seed,
                       help="seeds the metrics' random draws (AUC-Borji samples, AUC-Judd"
                            " jitter), per frame")
    group.add_argument("--no-jitter", dest="jitter", action="store_false",
                       help="no AUC-Judd tie-breaking jitter")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One of --checkpoint and --baseline; CLIP options only with a checkpoint."""
    check_cache_option(parser, args)
    if (args.checkpoint is None) == (args.baseline is None):
        parser.error("give --checkpoint or --baseline (one of them)")
    if args.baseline is not None and args.cached_clip:
        parser.error("--cached-clip is for a checkpoint; a baseline uses no CLIP")


def run(args: argparse.Namespace) -> None:
    from salmm.evaluation.evaluator import evaluate  # lazy: torch loads after the options

    evaluate(options(args))


if __name__ == "__main__":
    sys.exit(main())
