"""``salmm predict`` (``python -m salmm.predict``): saliency heat maps for a frame, a folder of
frames, a video or a prepared split (with the ground truth beside), one PNG per frame and an
animation of a sequence. What it draws and how: :mod:`salmm.deploy.pictures`.
"""

from __future__ import annotations

import argparse
import functools
import sys

from pipeline.core.commandline import (
    module_main,
    module_parse_args,
    positive_int,
)
from salmm.cli import (
    MODEL_OPTIONS_NOTE,
    add_model_options,
    add_picture_options,
    model_options,
)
from salmm.deploy.options import PICTURES_FPS, PredictOptions
from salmm.render.style import ANIMATION_FORMATS

SUMMARY = ("Saliency heat maps over a frame, a folder of frames, a video or a prepared split (with"
           " the ground truth beside), plus an animation of a sequence. " + MODEL_OPTIONS_NOTE)


options = functools.partial(model_options, PredictOptions)
parse_args = module_parse_args(__name__, options)
main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of predict."""
    parser.add_argument("--input", required=True,
                        help="a frame, a folder of frames, a video, or a prepared dataset")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures")
    add_model_options(parser, prepared=False)
    group = parser.add_argument_group("frames and pictures")
    group.add_argument("--split", default="test", help="split of a prepared --input")
    group.add_argument("--batch-size", type=positive_int, default=PredictOptions.batch_size,
                       help="frames through the model at a time")
    add_picture_options(group, PICTURES_FPS)
    group.add_argument("--animation", choices=ANIMATION_FORMATS, default="auto",
                       help="auto: MP4 (H.264); gif; none")


def run(args: argparse.Namespace) -> None:
    from salmm.deploy.pictures import predict  # lazy: torch loads after the options

    predict(options(args))


if __name__ == "__main__":
    sys.exit(main())
