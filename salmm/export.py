"""``salmm export`` (``python -m salmm.export``): a checkpoint as two ONNX graphs a deployment can
ship - ``salmm.onnx`` (the network), ``clip.onnx`` (the frozen CLIP encoder with its
preprocessing) - and ``export.json`` describing them, each graph checked against PyTorch before
anything is written. What and how: :mod:`salmm.deploy.graphs`.
"""

from __future__ import annotations

import argparse
import functools
import sys

from pipeline.core.commandline import (
    module_main,
    module_parse_args,
    parse_size,
)
from salmm.cli import MODEL_OPTIONS_NOTE, add_model_options, model_options
from salmm.deploy.options import DEFAULT_OPSET, INT8_COSINE, INT8_FRAMES, ExportOptions

SUMMARY = ("Export a checkpoint as ONNX graphs: the SalM2 network and the frozen CLIP encoder"
           " with its preprocessing, plus export.json describing them. " + MODEL_OPTIONS_NOTE)


options = functools.partial(model_options, ExportOptions)
parse_args = module_parse_args(__name__, options)
main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of export."""
    add_model_options(parser, prepared=False, cached=False, amp=False)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the graphs")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--size", type=parse_size, metavar="WxH",
                        help="frame size of the graphs (default: the checkpoint's training"
                             " size; 256x256 for official checkpoints)")
    parser.add_argument("--clip-int8", metavar="VIDEO|DIR",
                        help="also write clip-int8.onnx, CLIP with int8 weights (about 3x"
                             " faster on a CPU), when its embeddings keep a cosine >="
                             f" {INT8_COSINE:g} to float32 on every one of up to {INT8_FRAMES}"
                             " of these frames of yours (refused otherwise; recorded in"
                             " export.json)")


def run(args: argparse.Namespace) -> None:
    from salmm.deploy.graphs import export  # lazy: torch and onnx load after the options

    export(options(args))


if __name__ == "__main__":
    sys.exit(main())
