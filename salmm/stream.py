"""``salmm stream`` (``python -m salmm.stream``): driver attention live, frame by frame, on a
video, a camera, a folder of frames or an MJPEG stream on standard input; the overlay into an MP4
and a window, latency and frame rate reported. How: :mod:`salmm.deploy.live`.
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
from salmm.deploy.options import BACKENDS, EXPORT_CACHE, STREAM_FPS, StreamOptions

SUMMARY = ("Live driver attention: predict each frame of a video, camera, folder or MJPEG stream"
           " as it comes, draw the overlay, report latency and fps. " + MODEL_OPTIONS_NOTE)
CONFIG_FILE = True  # --config FILE / --print-config (pipeline.core.configfile)


options = functools.partial(model_options, StreamOptions)
parse_args = module_parse_args(__name__, options)
main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of stream."""
    parser.add_argument("--input", required=True,
                        help="a video file, a camera index (0), a folder of frames, or - (MJPEG"
                             " on standard input)")
    add_model_options(parser, prepared=False, cached=False)
    group = parser.add_argument_group("streaming")
    group.add_argument("--refresh-every", type=positive_int, default=1, metavar="K",
                       help="run CLIP on every K-th frame, reusing its embedding between"
                            " (1: every frame, as published)")
    group.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="torch (eager) or onnx (onnxruntime, CPU)")
    group.add_argument("--onnx", metavar="DIR", help="an export of this checkpoint (salmm"
                       f" export); default: exported once into {EXPORT_CACHE}/")
    group.add_argument("--clip-int8", action="store_true",
                       help="onnx backend: CLIP from the export's clip-int8.onnx (salmm export"
                            " --clip-int8 VIDEO|DIR; its cosine to float32 is in export.json)")
    group.add_argument("--out", metavar="VIDEO.mp4", help="write the overlays as an MP4")
    group.add_argument("--show", action="store_true",
                       help="show the overlays in a window (q or Esc stops)")
    group.add_argument("--threads", type=positive_int,
                       help="intra-op threads (default: one for a file or folder, whose stages share the"
                            " cores; torch's, adapted to the load, for a live source)")
    add_picture_options(group, STREAM_FPS)


def run(args: argparse.Namespace) -> None:
    from salmm.deploy.live import stream  # lazy: torch and cv2 load after the options

    stream(options(args))


if __name__ == "__main__":
    sys.exit(main())
