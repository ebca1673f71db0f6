"""``salmm certify`` (``python -m salmm.certify``): run the authors' MATLAB evaluation loop (GNU
Octave or MATLAB) on an ``evaluate --export-mat`` folder and compare it with salmm's numbers,
metric by metric; ``certificate.md`` says what agreed (see
:mod:`salmm.evaluation.certification`). Exit status 0 when every metric agrees, 1 when not.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.commandline import module_main
from salmm.evaluation.options import ENGINES, CertifyOptions

SUMMARY = ("Run the official MATLAB evaluation loop (Octave or MATLAB) on an evaluate"
           " --export-mat folder and compare it with salmm's numbers.")


main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The certification's options."""
    parser.add_argument("--export", required=True, metavar="DIR",
                        help="the folder evaluate --export-mat wrote")
    parser.add_argument("--official-metrics", required=True, metavar="DIR",
                        help="folder with the official calcFor*.m and metric .m files")
    parser.add_argument("--root", metavar="RAW", help="the raw dataset (its fixdata/ files);"
                        " TrafficGaze and DrFixD-rainy")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto: Octave if installed, else MATLAB")


def run(args: argparse.Namespace) -> int:
    from salmm.evaluation.certification import certify  # lazy: scipy loads after the options

    return certify(CertifyOptions(args.export, args.official_metrics, args.root, args.engine))


if __name__ == "__main__":
    sys.exit(main())
