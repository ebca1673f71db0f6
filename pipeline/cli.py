"""``python -m pipeline COMMAND ...``: the pipeline's command line.

Each command lives in its own module, which provides

* ``add_arguments(parser: argparse.ArgumentParser) -> None`` — the command's options, and
* ``run(args: argparse.Namespace) -> int`` — does the work, returns the exit code.

Adding a command is one entry in :data:`COMMANDS`. Only the chosen command's module is
imported, so ``python -m pipeline synth`` does not pay for importing torch.

Exit codes: 0 success, 1 unexpected failure or an output that cannot be written (one line
naming it: a full disk, no permission, a folder another run holds), 2 bad input or usage (one
line on stderr naming the file and the problem), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterable, Sequence

from pipeline.core.errors import run_reporting

log = logging.getLogger("pipeline")

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipeline.synth",
              "write a small SYNTHETIC raw dataset in a real download layout (tests, demos)"),
    "normalize": ("pipeline.normalize",
                  "turn a raw dataset into deterministic WebDataset shards + a versioned manifest"),
    "verify": ("pipeline.verify",
               "re-hash a prepared dataset against its manifest; say OK or what differs"),
    "embed": ("pipeline.embed",
              "compute the CLIP embedding cache (Zarr) of a prepared dataset, frames and flips"),
}
"""Command name -> (module providing add_arguments/run, one-line help)."""


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser.

    Args:
        commands: the commands whose options are added (importing their modules); default
            all. Every command is listed in ``--help`` either way.
    """
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Driver-gaze datasets (TrafficGaze, DrFixD-rainy, BDDA): raw data to "
                    "training data.")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary)
        if name in wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def configure_logging(level: int = logging.INFO) -> None:
    """One stderr handler on the root logger: ``LEVEL name: message``.

    Leaves logging alone if the root logger already has handlers (an embedding program or
    pytest configured it).
    """
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), configure logging once, run the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    parser = build_parser([chosen] if chosen else [])
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet
                      else logging.INFO)
    return run_reporting(lambda: args.run(args), log)
