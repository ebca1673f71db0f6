"""``salmm prepare``: the ``prepare/<dataset>`` flow (:func:`flows.prepare.prepare`) run in this
process on Prefect's ephemeral server - the same check layout -> normalize -> embed -> verify ->
publish the deployments run, without starting a server first."""

from __future__ import annotations

import argparse
import logging
import os

from pipeline.core.commandline import non_negative_int, parse_size, unit_float
from pipeline.datasets import DATASETS
from pipeline.encoders.clip_spec import add_clip_options
from pipeline.formats.shards import DEFAULT_FRAME_CODEC, FRAME_CODECS
from pipeline.normalize.settings import DECODES

log = logging.getLogger("flows.prepare")
SUMMARY = ("Prepare a raw dataset as `prefect deployment run prepare/<dataset>` does: shards and"
           " manifest, CLIP cache, verify, in this process.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flow's parameters as options."""
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="raw dataset root (holds train.json, ...)")
    parser.add_argument("--out", required=True, help="prepared folder (local path or fsspec URL)")
    parser.add_argument("--size", default="256x256", type=parse_size, metavar="WxH",
                        help="prepared frame size, width x height")
    parser.add_argument("--decode", choices=DECODES, default="faithful",
                        help="faithful: as the published loader; fast: reduced-scale JPEG"
                             " decoding")
    parser.add_argument("--frame-codec", choices=FRAME_CODECS, default=DEFAULT_FRAME_CODEC,
                        help="png: lossless, the published loader's pixels; jpeg95: smaller,"
                             " lossy")
    parser.add_argument("--ground-truth", choices=("saliency_fix", "saliency"),
                        help="dreyeve: the gaze maps of the labels (default saliency_fix)")
    add_clip_options(parser)
    parser.add_argument("--device", default="cpu", help="device of the CLIP encoder")
    parser.add_argument("--workers", type=non_negative_int,
                        help="Dask workers (default: one per usable core)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable frames (reported) instead of stopping")
    parser.add_argument("--max-bad-fraction", type=unit_float, default=0.01,
                        help="with --skip-bad, fail if more than this fraction of frames is bad")


def run(args: argparse.Namespace) -> None:
    if getattr(args, "quiet", False):       # Prefect sets its loggers' levels from its settings
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.prepare import prepare  # lazy: Prefect loads after the options (and the level)

    height, width = args.size
    prepare(args.dataset, args.root, args.out, size=f"{width}x{height}", decode=args.decode,
            frame_codec=args.frame_codec, clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained, profile=args.profile, device=args.device,
            workers=args.workers, skip_bad=args.skip_bad,
            max_bad_fraction=args.max_bad_fraction, ground_truth=args.ground_truth)
