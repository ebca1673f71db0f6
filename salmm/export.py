"""``salmm export`` (``python -m salmm.export``): a checkpoint as two ONNX graphs a deployment can
ship - ``salmm.onnx`` (the network), ``clip.onnx`` (the frozen CLIP encoder with its
preprocessing) - and ``export.json`` describing them, each graph checked against PyTorch before
anything is written (``--out``; :mod:`salmm.deploy.graphs`); and/or as a Hugging Face Hub folder
(``--hub-folder``: safetensors, config.json, model card; ``--push-to-hub`` uploads it;
:mod:`salmm.deploy.hub_folder`).
"""

from __future__ import annotations

import argparse
import functools
import logging
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


log = logging.getLogger("salmm.export")
options = functools.partial(model_options, ExportOptions)
parse_args = module_parse_args(__name__, options)
main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of export."""
    add_model_options(parser, prepared=False, cached=False, amp=False)
    parser.add_argument("--out", metavar="DIR", help="folder for the ONNX graphs")
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--hub-folder", metavar="DIR", help="write the weights as a Hub folder:"
                     " model.safetensors, config.json and a model card")
    hub.add_argument("--evaluation", metavar="SUMMARY", help="a `salmm evaluate` summary.json"
                     " (or its folder) of this checkpoint: its scores go into the model card")
    hub.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the Hub folder to this"
                     " model repository (created if need be; log in with `hf auth login`)")
    hub.add_argument("--private", action="store_true", help="with --push-to-hub: a private"
                     " repository")
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


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage: something to write."""
    if not (args.out or args.hub_folder or args.push_to_hub):
        parser.error("give --out (ONNX graphs), --hub-folder and/or --push-to-hub")


def run(args: argparse.Namespace) -> None:
    if args.out:
        from salmm.deploy.graphs import export  # lazy: torch and onnx load after the options

        export(options(args))
    if args.hub_folder or args.push_to_hub:
        import tempfile  # lazy: only for Hub folders

        from salmm.deploy.hub_folder import write_hub_folder  # lazy: torch, as above
        from salmm.model.hub import push_folder  # lazy: as above

        with tempfile.TemporaryDirectory(prefix="salmm-hub-") as temp:
            folder = args.hub_folder or temp
            write_hub_folder(args.checkpoint, folder, evaluation=args.evaluation,
                             repo_hint=args.push_to_hub)
            if args.push_to_hub:
                url = push_folder(folder, args.push_to_hub, private=args.private)
                log.info("pushed %s to the Hub: %s", folder, url)


if __name__ == "__main__":
    sys.exit(main())
