"""``salmm <command>``: the one command line, and the option groups the commands share.

Every command is a module with ``SUMMARY``, ``add_arguments(parser)`` and ``run(args)``
(:mod:`pipeline.core.commandline`, which also holds the one error and exit-code policy: 2 bad
input, 1 an output that cannot be written, 130 Ctrl-C). :data:`COMMANDS` names them; only the
chosen one is imported, and a command imports its heavy machinery (torch, open_clip) only in
``run``, so ``--help`` and usage errors come at once. ``python -m salmm.<command>`` and
``python -m pipeline <command>`` run the same modules.

``prepare`` is the Prefect flow :func:`flows.prepare.prepare` run in this process (the
deployments run the same flow); it is named here by its module, never imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection, Sequence
from typing import TypeVar

from pipeline.core.commandline import (
    dispatch,
    dispatcher_parser,
    non_negative_int,
    options_from,
    parse_size,
    positive_float,
    positive_int,
    unit_float,
)
from pipeline.encoders.clip_spec import add_clip_options
from salmm.render.style import COLORMAP_NAMES, DEFAULT_ALPHA, DEFAULT_COLORMAP
from salmm.training.config import AMP_CHOICES, ORDERS, TrainConfig

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("flows.command",
                "raw dataset -> shards, manifest, verify, CLIP cache (the prepare flow)"),
    "synth": ("pipeline.synth", "write a small SYNTHETIC raw dataset in a real download layout"),
    "download": ("pipeline.download",
                 "fetch a dataset from the SalM2 authors' Hub mirror (BDDA: the steps)"),
    "check-layout": ("pipeline.check_layout",
                     "check a raw dataset root against its split lists before normalize"),
    "normalize": ("pipeline.normalize.command",
                  "raw dataset -> deterministic WebDataset shards + versioned manifest"),
    "verify": ("pipeline.verify", "re-hash a prepared dataset against its manifest"),
    "embed": ("pipeline.embed",
              "CLIP embedding cache (Zarr) of a prepared dataset, frames and flips"),
    "train": ("salmm.train", "train SalM2 on a prepared dataset"),
    "evaluate": ("salmm.evaluate", "score a checkpoint or baseline with the official metrics"),
    "compare": ("salmm.compare", "every checkpoint and baseline on every dataset, one table"),
    "certify": ("salmm.certify", "run the authors' MATLAB loop on an export and compare"),
    "predict": ("salmm.predict", "heat maps over frames, folders, videos or a prepared split"),
    "stream": ("salmm.stream", "live attention on a video, camera, folder or MJPEG stream"),
    "export": ("salmm.export", "a checkpoint as ONNX graphs (SalM2 and CLIP)"),
    "official": ("salmm.official", "check an official model_best_*.tar checkpoint"),
    "data": ("salmm.versions", "prepared data versions: list, diff, reproduce, which"),
}
"""Command name -> (its module, the one-line help ``salmm --help`` shows without importing it)."""

T = TypeVar("T")
DEFAULT_MAX_WORKERS = 8
CHECKPOINT_CLIP = "the checkpoint's"
"""Default of a model command's CLIP options: what the checkpoint was trained with."""
MODEL_OPTIONS_NOTE = ("The CLIP options default to the ones the checkpoint was trained with"
                      " (ViT-B-32, openai, salmm for an official checkpoint).")


def default_workers() -> int:
    """Data workers per training process: the CPUs divided among the training processes on
    this machine (``LOCAL_WORLD_SIZE`` under torchrun), at least 1, at most 8."""
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(DEFAULT_MAX_WORKERS, share))


# ---- option groups -----------------------------------------------------------------------------


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """--prepared, --cache, --size, --workers, --order, --shuffle-buffer (the trainer's data)."""
    group = parser.add_argument_group("data")
    group.add_argument("--prepared", required=True, metavar="PREPARED",
                       help="prepared dataset (folder or fsspec URL with manifest.json)")
    group.add_argument("--cache", metavar="CACHE",
                       help="CLIP embedding cache, with --cached-clip (default: the one `salmm"
                            " embed` writes for the CLIP options)")
    group.add_argument("--size", type=parse_size, default=TrainConfig.size, metavar="WxH",
                       help="frame size, width x height; must equal the prepared size"
                            " (default 256x256)")
    group.add_argument("--workers", type=non_negative_int, default=default_workers(),
                       help="data-loading processes per training process (0: load in the"
                            " training process; default: the CPUs shared among this machine's"
                            f" training processes, at most {DEFAULT_MAX_WORKERS})")
    group.add_argument("--order", choices=ORDERS, default=TrainConfig.order,
                       help="training sample order: permutation, a fresh permutation of the"
                            " split each epoch read by random access, as published; stream,"
                            " shards in a shuffled order through a shuffle buffer (for remote"
                            " stores)")
    group.add_argument("--shuffle-buffer", type=positive_int, default=TrainConfig.shuffle_buffer,
                       help="--order stream: samples held in the shuffle buffer of each data"
                            " worker")


def add_runtime_options(parser: argparse.ArgumentParser, *, amp: bool = True) -> None:
    """--device (and --amp when ``amp``)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    if amp:
        group.add_argument("--amp", choices=AMP_CHOICES, default=TrainConfig.amp,
                           help="off: float32, as published; bf16, fp16: autocast, a faster"
                                " opt-in that changes the numbers (auto: bf16 where supported,"
                                " else fp16; CPU: off)")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """--epochs, --batch-size, --lr, --weight-decay, --seed."""
    group = parser.add_argument_group("recipe")
    group.add_argument("--epochs", type=positive_int, default=TrainConfig.epochs,
                       help="epochs to train")
    group.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size,
                       help="samples per step (over all processes: each takes its share)")
    group.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam learning rate")
    group.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                       help="Adam weight decay")
    group.add_argument("--seed", type=int, default=TrainConfig.seed,
                       help="seeds the weights, the shuffles and the flips")


def add_model_options(parser: argparse.ArgumentParser, *, prepared: bool, cached: bool = True,
                      checkpoint_required: bool = True, amp: bool = True) -> None:
    """The options the model commands share: --checkpoint; --prepared when ``prepared``;
    --cached-clip and --cache when ``cached`` (prepared inputs); the CLIP options, defaulting
    to the checkpoint's; --device and, when ``amp``, --amp (default off)."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--checkpoint", required=checkpoint_required, metavar="CKPT",
                       help="a salmm train checkpoint or an official model_best_*.tar")
    if prepared:
        group.add_argument("--prepared", required=True, metavar="PREPARED",
                           help="prepared dataset (folder or fsspec URL with manifest.json)")
    if cached:
        group.add_argument("--cached-clip", action="store_true",
                           help="take CLIP embeddings from the cache `salmm embed` wrote"
                                " (prepared inputs only) instead of running CLIP")
        group.add_argument("--cache", metavar="CACHE",
                           help="CLIP embedding cache, with --cached-clip (default: the embed"
                                " command's path for the CLIP options)")
    add_clip_options(parser, CHECKPOINT_CLIP, note=f" (default: {CHECKPOINT_CLIP})")
    add_runtime_options(parser, amp=amp)


def given_clip_options(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    """The CLIP options the user gave on a parsed command line, as (name, value) pairs; the
    others are the checkpoint's."""
    return tuple((k, getattr(args, k)) for k in ("clip_model", "clip_pretrained", "profile")
                 if getattr(args, k) != CHECKPOINT_CLIP)


def model_options(cls: type[T], args: argparse.Namespace) -> T:
    """A model command's options dataclass ``cls`` from its parsed command line, with the CLIP
    options the user gave (:func:`given_clip_options`)."""
    return options_from(cls, args, clip=given_clip_options(args))


def add_picture_options(group: argparse._ArgumentGroup, fps: float) -> None:
    """--limit, --size, --fps (default: the input's, else ``fps``), --colormap, --alpha and
    --allow-short-video: which frames the commands that draw predictions over frames (predict,
    stream) take, at what size the model sees them, and how the overlays are drawn."""
    group.add_argument("--limit", type=positive_int, help="at most this many frames")
    group.add_argument("--size", type=parse_size, metavar="WxH",
                       help="model input size for raw frames (default: the checkpoint's"
                            " training size; 256x256 for official checkpoints)")
    group.add_argument("--fps", type=positive_float, help="frame rate of the video or animation"
                       f" written (default: the input's, else {fps:g})")
    group.add_argument("--colormap", choices=COLORMAP_NAMES, default=DEFAULT_COLORMAP,
                       help="colour map of the heat map")
    group.add_argument("--alpha", type=unit_float, default=DEFAULT_ALPHA,
                       help="heat-map opacity at the most salient pixel")
    group.add_argument("--allow-short-video", action="store_true",
                       help="use the frames of a video that ends before the frames it announces"
                            " (damaged or truncated) instead of refusing it")


def check_cache_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for --cache without --cached-clip."""
    if getattr(args, "cache", None) is not None and not getattr(args, "cached_clip", False):
        parser.error("--cache is only used with --cached-clip")


# ---- the dispatcher ----------------------------------------------------------------------------


def build_parser(commands: Collection[str] = ()) -> argparse.ArgumentParser:
    """The ``salmm`` parser; only the ``commands`` named are imported for their options."""
    return dispatcher_parser(
        "salmm", "Driver-attention data and the SalM2 model: prepare the datasets, train,"
        " evaluate, predict, export, stream.", COMMANDS, commands)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``salmm`` console script: parse ``argv`` (default ``sys.argv[1:]``), run the
    command, return its exit status."""
    return dispatch(build_parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
