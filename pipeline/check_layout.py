"""``salmm check-layout --dataset D --root DIR`` (``python -m pipeline check-layout``): what a
raw dataset root holds against what its split lists need, in a few lines, before any normalize:
entries per split file, and per folder of the layout the files needed, present and missing (the
first few named) and the files no split lists. Exit 0 when complete, 1 when files are missing,
2 when the root is not the dataset's at all."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.core.commandline import module_main
from pipeline.datasets import DATASETS

SUMMARY = ("Check a raw dataset root against its split lists before normalize: what is missing"
           " and what is extra, per folder.")
LOGGER = "pipeline"
log = logging.getLogger("pipeline.layout")

main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="raw dataset root (holds train.json, ...)")


def run(args: argparse.Namespace) -> int:
    from pipeline.datasets.layout import layout_report, report_lines  # lazy: as the others

    report = layout_report(args.dataset, args.root)
    for line in report_lines(report):
        log.info("%s", line)
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
