"""``salmm download trafficgaze|drfixd-rainy --out DIR`` (``python -m pipeline download``): a
dataset from the SalM² authors' Hugging Face mirror, unpacked into the layout the readers expect
and checked against its split lists; the repository, revision and commit fetched are recorded
in ``DOWNLOAD.json``. For BDDA (no mirror) it says the steps to get it. Exit 0 when the result is
complete, 1 when files are missing, 2 when the download is not possible (one line why)."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.core.commandline import module_main
from pipeline.datasets import DATASETS

SUMMARY = ("Download a dataset from the SalM2 authors' Hugging Face mirror into the layout the"
           " readers expect, and check it (BDDA: the steps to get it).")
LOGGER = "pipeline"
log = logging.getLogger("pipeline.download")

main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--out", required=True, help="folder to put the dataset's root in")
    parser.add_argument("--revision", default="main", help="the mirror's branch, tag or commit"
                        " (default main; the commit fetched is recorded)")


def run(args: argparse.Namespace) -> int:
    from pipeline.datasets.download import download  # lazy: huggingface_hub, when run
    from pipeline.datasets.layout import layout_report, report_lines  # lazy: as above

    root, record = download(args.dataset, args.out, args.revision)
    log.info("%s: %s at commit %s", root, record["repository"], record["commit"][:12])
    report = layout_report(args.dataset, root)
    for line in report_lines(report):
        log.info("%s", line)
    if not any(report.splits.values()):
        log.warning("no split files in the download: take train.json, valid.json and test.json"
                    " from https://github.com/zhao-chunyu/SaliencyMamba (datasets/) into %s", root)
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
