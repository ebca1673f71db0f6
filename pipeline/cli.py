"""``python -m pipeline COMMAND ...``: the pipeline's command line (also ``salmm COMMAND``).

Each command is a module with ``SUMMARY``, ``add_arguments(parser)``, ``run(args)`` and
``LOGGER = "pipeline"`` (its errors read ``ERROR pipeline: ...``; see
:mod:`pipeline.core.commandline`); adding one is an entry in :data:`COMMANDS`. Only the chosen
command's module is imported, so ``python -m pipeline synth`` does not pay for importing torch.

Exit codes: 0 success, 1 unexpected failure or an output that cannot be written (one line
naming it: a full disk, no permission, a folder another run holds), 2 bad input or usage (one
line on stderr naming the file and the problem), 130 interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

from pipeline.core.commandline import dispatch, dispatcher_parser

COMMANDS: dict[str, tuple[str, str]] = {
    "check-layout": ("pipeline.check_layout",
                     "check a raw dataset root against its split lists: missing and extra files"),
    "download": ("pipeline.download",
                 "fetch a dataset from the SalM2 authors' Hub mirror into the readers' layout"),
    "synth": ("pipeline.synth",
              "write a small SYNTHETIC raw dataset in a real download layout (tests, demos)"),
    "normalize": ("pipeline.normalize.command",
                  "turn a raw dataset into deterministic WebDataset shards + a versioned manifest"),
    "verify": ("pipeline.verify",
               "re-hash a prepared dataset against its manifest; say OK or what differs"),
    "embed": ("pipeline.embed",
              "compute the CLIP embedding cache (Zarr) of a prepared dataset, frames and flips"),
}
"""Command name -> (its module, one-line help)."""


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser.

    Args:
        commands: the commands whose options are added (importing their modules); default
            all. Every command is listed in ``--help`` either way.
    """
    return dispatcher_parser(
        "python -m pipeline", "Driver-gaze datasets (TrafficGaze, DrFixD-rainy, BDDA): raw data"
        " to training data.", COMMANDS, set(COMMANDS if commands is None else commands))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), configure logging once, run the command."""
    return dispatch(build_parser, COMMANDS, argv)
