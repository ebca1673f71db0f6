"""``salmm train`` (``python -m salmm.train``): train SalM² on a prepared dataset.

With ``--cached-clip`` the CLIP embedding of every frame (and of its mirror image) comes from
the cache ``salmm embed`` wrote, so a step runs only the 76k-parameter model; without it the
model runs its frozen CLIP inline, as the published code does. The run itself is
:func:`salmm.training.trainer.train`. Exit status 3: the loss diverged (``last-good.pt`` kept).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from pipeline.core.commandline import (
    module_main,
    module_parse_args,
    options_from,
    positive_int,
)
from pipeline.encoders.clip_spec import ClipSpec, add_clip_options
from salmm.cli import (
    add_data_options,
    add_recipe_options,
    add_runtime_options,
    check_cache_option,
)
from salmm.training.config import TrainConfig

SUMMARY = ("Train SalM2 on a prepared dataset. With --cached-clip the CLIP embeddings come from"
           " the cache `salmm embed` wrote; without it the model runs its frozen CLIP inline, as"
           " published. Defaults follow the published recipe.")
log = logging.getLogger("salmm.train")
CONFIG_FILE = True  # --config FILE / --print-config (pipeline.core.configfile)

options = functools.partial(options_from, TrainConfig)
parse_args = module_parse_args(__name__, options)
"""Command line -> :class:`TrainConfig` (argparse exits with a usage line on bad options)."""
main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's options."""
    parser.add_argument("--cached-clip", action="store_true",
                        help="use the CLIP embedding cache instead of running CLIP")
    parser.add_argument("--out", metavar="RUNS/NAME",
                        help="run folder (default: runs/<date>-<time>, or the folder of"
                             " --resume)")
    parser.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU intra-op threads for the whole run (default 1, whatever the"
                             " machine's load: the numbers depend on it; a resumed run reuses its"
                             " checkpoint's, so it repeats an uninterrupted one exactly)")
    add_data_options(parser)
    add_recipe_options(parser)
    add_clip_options(parser, ClipSpec(TrainConfig.clip_model, TrainConfig.clip_pretrained,
                                      TrainConfig.profile))
    add_runtime_options(parser)


check = check_cache_option


def run(args: argparse.Namespace) -> int:
    """Train; 0 done, 3 the loss diverged (one line saying where the last good state is)."""
    from salmm.training.loop import NonFiniteLoss  # lazy: torch loads after the options
    from salmm.training.trainer import train  # lazy: as above

    try:
        train(options(args))
    except NonFiniteLoss as err:
        log.error("%s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
