"""What evaluate, predict and the streaming predictor share: a checkpoint loaded with the CLIP it
was trained with, its command-line options, the model run on a batch, and a prepared split's
samples.

* :func:`load_model` - our checkpoints and the authors' released ones (every key checked), the
  CLIP options resolved against what the checkpoint was trained with (:func:`resolve_clip`),
  the frozen encoder attached when CLIP runs inline -> a :class:`LoadedModel`;
* :func:`predict_batch` - uint8 frames (and embeddings) -> saliency maps;
* :func:`add_model_options` / :func:`given_clip_options` - the shared options;
* :func:`prepared_split`, :func:`iter_samples`, :func:`open_eval_cache`, :func:`batched` - a
  prepared split's samples and cached embeddings, checked.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.encoders.clip import PUBLISHED, ClipSpec, cached_encoder
from pipeline.formats.clip_cache import open_checked_cache
from pipeline.formats.manifest import prepared_size, read_manifest
from pipeline.formats.shards import decode_fixations, decode_meta, split_shards
from salmm.data.stages import decode, read_shards
from salmm.model.checkpoint import FORMAT, load_checkpoint
from salmm.model.devices import autocast, autocast_dtype, pick_device
from salmm.model.net import SalMM
from salmm.official import read_official
from salmm.options import (
    add_clip_options,
    add_inference_options,
    add_runtime_options,
    options_from,
    parse_checked,
)

log = logging.getLogger("salmm.inference")
T = TypeVar("T")

FROM_CHECKPOINT = object()
"""Default of the CLIP options: take the value the checkpoint was trained with."""
PUBLISHED_CLIP = {"clip_model": PUBLISHED.model, "clip_pretrained": PUBLISHED.pretrained,
                  "profile": PUBLISHED.profile}
"""CLIP options of the official checkpoints: ViT-B-32, OpenAI weights, the published profile."""


@dataclass
class LoadedModel:
    """A checkpoint's SalMM in eval mode on ``device``, with what it was trained with.

    ``size``: (height, width) it was trained at; ``info``: its identity for summaries (path,
    sha256, kind "salmm-train" | "official", epoch, valid_loss, dataset_version, git_commit);
    ``clip``: the CLIP options in use (run inline when the model carries the encoder).
    """

    model: torch.nn.Module
    device: torch.device
    autocast: torch.dtype | None
    size: tuple[int, int]
    info: dict[str, Any]
    clip: ClipSpec


def file_sha256(path: str) -> str:
    folder, _, name = path.rpartition("/")
    return Folder(folder or ".").sha256(name)


def checkpoint_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The training options stored in one of our checkpoints; None for an official one."""
    if raw.get("format") != FORMAT or not isinstance(raw.get("config"), dict):
        return None
    return raw["config"]


def resolve_clip(path: str, config: dict[str, Any] | None, given: dict[str, Any]) -> ClipSpec:
    """The CLIP options to use: each one the user ``given`` (:data:`FROM_CHECKPOINT` when not),
    else what the checkpoint was trained with (``config``; the published ones for an official
    checkpoint).

    BadInputError (naming the checkpoint) when a given model name or profile differs from the
    training one, or random weights are swapped for real ones or back: the model would get
    embeddings it never saw. Other weights (say a local copy of the OpenAI file for "openai")
    are allowed with a warning.
    """
    trained = {k: config[k] for k in PUBLISHED_CLIP} if config is not None else None
    chosen = {}
    for key, default in PUBLISHED_CLIP.items():
        value = given.get(key, FROM_CHECKPOINT)
        if value is FROM_CHECKPOINT:
            value = trained[key] if trained is not None else default
        chosen[key] = value
    if trained is not None:
        option = {"clip_model": "--clip-model", "profile": "--profile"}
        for key, flag in option.items():
            if chosen[key] != trained[key]:
                raise BadInputError(path, f"trained with {flag} {trained[key]}, not"
                                    f" {chosen[key]}; leave {flag} out to use the checkpoint's")
        if chosen["clip_pretrained"] != trained["clip_pretrained"]:
            if None in (chosen["clip_pretrained"], trained["clip_pretrained"]):
                raise BadInputError(path, f"trained with CLIP weights"
                                    f" {trained['clip_pretrained'] or 'none (random)'}, not"
                                    f" {chosen['clip_pretrained'] or 'none (random)'}; leave"
                                    " --clip-pretrained out to use the checkpoint's")
            log.warning("%s was trained with CLIP weights %s; using %s - scores are only"
                        " comparable if these are the same weights", path,
                        trained["clip_pretrained"], chosen["clip_pretrained"])
    choice = ClipSpec(chosen["clip_model"], chosen["clip_pretrained"], chosen["profile"])
    if choice.pretrained is None:
        log.warning("CLIP with RANDOM weights (--clip-pretrained none): for tests and smoke runs"
                    " only, the predictions mean nothing")
    return choice


def load_model(path: str, *, inline_clip: bool, given_clip: dict[str, Any],
               device: str | None = None, amp: str = "off") -> LoadedModel:
    """Load checkpoint ``path`` (ours or official; every key checked) into a SalMM on ``device``.

    ``inline_clip``: attach the frozen CLIP encoder (built from :func:`resolve_clip`'s choice)
    so the model embeds frames itself; otherwise embeddings are passed in. BadInputError (one
    line naming the file) for a missing, unreadable or mismatching checkpoint.
    """
    path = str(path)
    raw = load_checkpoint(path)
    weights = read_official(path)
    config = checkpoint_config(raw)
    clip = resolve_clip(path, config, given_clip)
    dev = pick_device(device)
    encoder = None
    if inline_clip:
        encoder = cached_encoder(clip, str(dev))
    model = SalMM(clip=encoder)
    model.load_state_dict(weights.state_dict, strict=True)
    model.to(dev).eval()
    info = {
        "path": path,
        "sha256": file_sha256(path),
        "kind": "salmm-train" if config is not None else "official",
        "epoch": weights.epoch,
        "valid_loss": weights.valid_loss,
        "dataset_version": raw.get("dataset_version"),
        "git_commit": raw.get("git_commit"),
        "trained_cached_clip": config.get("cached_clip") if config else None,
    }
    size = tuple(config["size"]) if config is not None else (256, 256)
    log.info("checkpoint %s (%s, epoch %s, sha256 %s...)", path, info["kind"], info["epoch"],
             info["sha256"][:12])
    return LoadedModel(model, dev, autocast_dtype(amp, dev), size, info, clip)


def predict_batch(loaded: LoadedModel, frames: torch.Tensor, emb: torch.Tensor | None
                  ) -> np.ndarray:
    """uint8 frames [B, 3, H, W] (and embeddings [B, D] unless CLIP runs inline) -> predicted
    saliency float32 [B, H, W] in (0, 1)."""
    with torch.inference_mode(), autocast(loaded.device, loaded.autocast):
        x = frames.to(loaded.device).float().div_(255)
        out = loaded.model(x, None if emb is None else emb.to(loaded.device))
    return out.float()[:, 0].cpu().numpy()


def parse_model_args(parser: argparse.ArgumentParser, cls: type[T],
                     argv: Sequence[str] | None) -> T:
    """A model command's options ``cls`` from its command line (checked; the CLIP options the
    user gave in its ``clip`` field)."""
    args = parse_checked(parser, argv)
    return options_from(cls, args, clip=given_clip_options(args))


def given_clip_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """The CLIP options the user gave on a parsed command line, as (name, value) pairs; the
    others are taken from the checkpoint."""
    return tuple((k, getattr(args, k)) for k in PUBLISHED_CLIP
                 if getattr(args, k) is not FROM_CHECKPOINT)


MODEL_OPTIONS_NOTE = ("The CLIP options default to the ones the checkpoint was trained with"
                      " (ViT-B-32, openai, salmm for an official checkpoint); --amp defaults to"
                      " off (float32).")


def add_model_options(parser: argparse.ArgumentParser, *, prepared: bool,
                      cached: bool = True, checkpoint_required: bool = True) -> None:
    """The options the model commands share: checkpoint, data (``prepared``; cached embeddings
    when ``cached``), CLIP (defaulting to the checkpoint's), device and autocast (default off).
    See :data:`MODEL_OPTIONS_NOTE`."""
    add_inference_options(parser, prepared=prepared, cached=cached,
                          checkpoint_required=checkpoint_required)
    add_clip_options(parser)
    add_runtime_options(parser)
    parser.set_defaults(**dict.fromkeys(PUBLISHED_CLIP, FROM_CHECKPOINT), amp="off")


def prepared_split(prepared: str, split: str) -> tuple[dict[str, Any], int]:
    """(manifest, sample count) of ``split``; BadInputError naming the manifest when the split
    is unknown or empty."""
    manifest = read_manifest(prepared)
    where = Folder(prepared).url("manifest.json")
    splits = manifest.get("splits", {})
    if split not in splits:
        raise BadInputError(where, f"no split {split!r} (has {', '.join(sorted(splits))})")
    samples = int(splits[split].get("samples", 0))
    if samples == 0:
        raise BadInputError(where, f"split {split!r} has no samples")
    return manifest, samples


def iter_samples(prepared: str, manifest: dict[str, Any], split: str) -> Iterator[dict[str, Any]]:
    """The split's samples in shard order: ``key``, ``frame`` uint8 [3, H, W], ``label`` float32
    [1, H, W], ``fixations`` int [N, 2] (row, col at source resolution), ``meta`` (the sample's
    json: dataset, video, frame, name, ...)."""
    size = prepared_size(manifest)
    for raw in read_shards(split_shards(prepared, manifest, split)):
        fixations, meta = decode_fixations(raw), decode_meta(raw)
        (sample,) = decode([raw], size)
        yield {**sample, "fixations": fixations, "meta": meta}


def batched(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of up to ``size`` consecutive items."""
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_eval_cache(path: str | None, prepared: str, manifest: dict[str, Any], split: str,
                    clip: ClipSpec) -> tuple[str, dict[str, Any]]:
    """(path, identity) of the CLIP cache after checking it was made from this dataset version
    with ``clip``'s model, weights and profile and holds every sample of ``split``."""
    return open_checked_cache(path, prepared, manifest, clip.identity(), [split])
