"""The options of the salmm commands: the option groups they share, the checks every one
makes, and the trainer's options.

:func:`build_parser` assembles the ``python -m salmm.train`` parser from small groups
(:func:`add_data_options`, :func:`add_clip_options`, :func:`add_runtime_options`,
:func:`add_recipe_options`, :func:`add_inference_options`) that the evaluate and predict
commands reuse; :func:`parse_checked` parses and checks any of their command lines and
:func:`options_from` makes a command's options dataclass of them (:func:`parse_args`: the
trainer's :class:`TrainConfig`). The CLIP weights option is parsed by
:func:`pipeline.encoders.clip.parse_weights`, the one parser of ``none``. Defaults follow the published
recipe: Adam, lr 1e-3, weight decay 1e-4, batch 32, 256x256 frames, seed 42, 100 epochs, float32,
a fresh permutation of the training split every epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.core.errors import run_reporting
from pipeline.encoders.clip import (
    DEFAULT_MODEL,
    DEFAULT_PROFILE,
    DEFAULT_WEIGHTS,
    PROFILES,
    ClipSpec,
)
from pipeline.encoders.clip import parse_weights as _pretrained
from salmm.data.stages import ORDERS
from salmm.render import overlay

log = logging.getLogger(__name__)
T = TypeVar("T")

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DEFAULT_MAX_WORKERS = 8


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (stored in every checkpoint as a dict)."""

    prepared: str                        # prepared dataset folder or URL (manifest.json + shards)
    cached_clip: bool = False            # True: CLIP embeddings from the cache; False: inline CLIP
    cache: str | None = None             # CLIP cache; None: the embed command's default path
    out: str | None = None               # run folder; None: runs/<date>-<time> (or the resumed one)
    resume: str | None = None            # checkpoint to continue from
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 42
    size: tuple[int, int] = (256, 256)   # (height, width) of the frames; must match the prepared data
    order: str = "permutation"           # permutation per epoch (published) | stream (shuffle buffer)
    shuffle_buffer: int = 1000           # --order stream: samples in each worker's shuffle buffer
    workers: int = 2                     # data-loading processes per training process (0: inline)
    device: str | None = None            # None: "cuda" when available, else "cpu"
    amp: str = "off"                     # float32 (published); bf16, fp16, auto: opt-in autocast
    threads: int | None = None           # CPU intra-op threads for the run; None: 1 (fixed)
    clip_model: str = DEFAULT_MODEL
    clip_pretrained: str | None = DEFAULT_WEIGHTS  # open_clip tag, file, hf-hub:..., None: random
    profile: str = DEFAULT_PROFILE       # CLIP preprocessing profile: salmm | openclip

    @property
    def clip(self) -> ClipSpec:
        """The run's CLIP encoder."""
        return ClipSpec(self.clip_model, self.clip_pretrained, self.profile)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for checkpoints and logs."""
        out = dataclasses.asdict(self)
        out["size"] = list(self.size)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`as_dict` (unknown keys are an error)."""
        values = dict(values)
        values["size"] = tuple(values["size"])
        return cls(**values)


#: Options that decide the numbers a run produces: a resumed run must use the same ones.
RECIPE_FIELDS = ("cached_clip", "batch_size", "lr", "weight_decay", "seed", "size", "order",
                 "shuffle_buffer", "clip_model", "clip_pretrained", "profile", "amp")


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (as ``python -m pipeline normalize --size``) or ``"256"`` -> (height,
    width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise argparse.ArgumentTypeError(f"size must look like 256x256 (width x height) or 256,"
                                         f" got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    return height, width


def default_workers() -> int:
    """Data workers per training process: the CPUs divided among the training processes on
    this machine (``LOCAL_WORLD_SIZE`` under torchrun), at least 1, at most 8."""
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(DEFAULT_MAX_WORKERS, share))


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """--prepared, --cache, --size, --workers, --shuffle-buffer."""
    group = parser.add_argument_group("data")
    group.add_argument("--prepared", required=True, metavar="PREPARED",
                       help="prepared dataset (folder or fsspec URL with manifest.json)")
    group.add_argument("--cache", metavar="CACHE",
                       help="CLIP embedding cache (default: the one `python -m pipeline embed`"
                            " writes for --clip-model/--clip-pretrained/--profile)")
    group.add_argument("--size", type=parse_size, default=TrainConfig.size, metavar="WxH",
                       help="frame size, width x height; must equal the prepared size"
                            " (default 256x256)")
    group.add_argument("--workers", type=non_negative_int, default=default_workers(),
                       help="data-loading processes per training process (0: load in the"
                            " training process; default: the CPUs shared among this machine's"
                            f" training processes, at most {DEFAULT_MAX_WORKERS})")
    group.add_argument("--order", choices=ORDERS, default=TrainConfig.order,
                       help="training sample order: permutation, a fresh permutation of the"
                            " split each epoch read by random access, as published (default);"
                            " stream, shards in a shuffled order through a shuffle buffer (for"
                            " remote stores)")
    group.add_argument("--shuffle-buffer", type=positive_int, default=TrainConfig.shuffle_buffer,
                       help="--order stream: samples held in the shuffle buffer of each data"
                            " worker")


def add_clip_options(parser: argparse.ArgumentParser) -> None:
    """--clip-model, --clip-pretrained, --profile."""
    group = parser.add_argument_group("CLIP")
    group.add_argument("--clip-model", default=TrainConfig.clip_model,
                       help="open_clip model name (default ViT-B-32, as published)")
    group.add_argument("--clip-pretrained", type=_pretrained, default=TrainConfig.clip_pretrained,
                       help="weights: open_clip tag, local file, hf-hub:org/repo, or none"
                            " (random; tests only)")
    group.add_argument("--profile", choices=PROFILES, default=TrainConfig.profile,
                       help="CLIP preprocessing: salmm (published) or openclip")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--device, --amp."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    group.add_argument("--amp", choices=AMP_CHOICES, default=TrainConfig.amp,
                       help="off: float32, as published (default); bf16, fp16: autocast, a"
                            " faster opt-in that changes the numbers (auto: bf16 where"
                            " supported, else fp16; CPU: off)")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """--epochs, --batch-size, --lr, --weight-decay, --seed."""
    group = parser.add_argument_group("recipe")
    group.add_argument("--epochs", type=positive_int, default=TrainConfig.epochs)
    group.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size)
    group.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam learning rate")
    group.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    group.add_argument("--seed", type=int, default=TrainConfig.seed,
                       help="seeds the weights, the shuffles and the flips")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m salmm.train`` parser."""
    parser = argparse.ArgumentParser(
        prog="python -m salmm.train",
        description="Train SalM2 on a prepared dataset. With --cached-clip the CLIP embeddings"
                    " come from the cache written by `python -m pipeline embed`; without it the"
                    " model runs its frozen CLIP inline, as published.")
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
    add_clip_options(parser)
    add_runtime_options(parser)
    return parser


def parse_checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                  ) -> argparse.Namespace:
    """``parser.parse_args(argv)`` plus the checks every salmm command with data options makes
    (argparse exits with a usage line on bad options)."""
    args = parser.parse_args(argv)
    if getattr(args, "cache", None) is not None and not args.cached_clip:
        parser.error("--cache is only used with --cached-clip")
    return args


def options_from(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """A command's options dataclass ``cls`` from the parsed ``args`` (the fields they have;
    ``values`` for the others)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **values)


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line -> :class:`TrainConfig` (argparse exits with a usage line on bad options)."""
    return options_from(TrainConfig, parse_checked(build_parser(), argv))


def add_inference_options(parser: argparse.ArgumentParser, *, prepared: bool = True,
                          cached: bool = True, checkpoint_required: bool = True) -> None:
    """--checkpoint (and --prepared when ``prepared``, --cached-clip and --cache when
    ``cached``): the model and data options of the ``salmm`` inference commands."""
    group = parser.add_argument_group("model and data")
    group.add_argument("--checkpoint", required=checkpoint_required, metavar="CKPT",
                       help="a salmm.train checkpoint or an official model_best_*.tar")
    if prepared:
        group.add_argument("--prepared", required=True, metavar="PREPARED",
                           help="prepared dataset (folder or fsspec URL with manifest.json)")
    if not cached:
        return
    group.add_argument("--cached-clip", action="store_true",
                       help="take CLIP embeddings from the cache `python -m pipeline embed` wrote"
                            " (prepared inputs only) instead of running CLIP")
    group.add_argument("--cache", metavar="CACHE",
                       help="CLIP embedding cache (default: the embed command's default path"
                            " for the CLIP options)")


def add_drawing_options(group: argparse._ArgumentGroup) -> None:
    """--colormap, --alpha and --allow-short-video: how the commands that draw predictions over
    frames (predict, stream) draw them, and whether a video that ends early is used."""
    group.add_argument("--colormap", choices=sorted(overlay.COLORMAPS),
                       default=overlay.DEFAULT_COLORMAP)
    group.add_argument("--alpha", type=unit_float, default=overlay.DEFAULT_ALPHA,
                       help="heat-map opacity at the most salient pixel")
    group.add_argument("--allow-short-video", action="store_true",
                       help="use the frames of a video that ends before the frames it announces"
                            " (damaged or truncated) instead of refusing it")


def run_command(action: Callable[[], Any],
                failures: Mapping[type[Exception], int] | None = None) -> int:
    """Run a command's ``action`` with logging set up; return its exit status.

    Bad input (:class:`~pipeline.core.errors.BadInputError`) exits 2, an output that cannot be
    written (:class:`~pipeline.core.errors.OutputError`, or a write's full-disk, read-only or
    permission OSError: :func:`~pipeline.core.errors.output_error`) 1, Ctrl-C 130, and each other
    expected failure in ``failures`` its own code, after one logged line saying what is
    wrong.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def run() -> None:              # what an action returns is its result, not a status
        action()
    return run_reporting(run, log, failures)
