"""A checkpoint loaded for inference with the CLIP it was trained with, and the model run on a
batch.

* :func:`load_model` - our checkpoints and the authors' released ones (every key checked), the
  CLIP options resolved against what the checkpoint was trained with (:func:`resolve_clip`),
  the frozen encoder attached when CLIP runs inline -> a :class:`LoadedModel`;
* :func:`predict_batch` - uint8 frames (and embeddings) -> saliency maps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.encoders.clip import cached_encoder
from pipeline.encoders.clip_spec import PUBLISHED, RANDOM_WARNING, ClipSpec
from salmm.model import hub
from salmm.model.checkpoint import FORMAT, load_checkpoint
from salmm.model.devices import autocast, autocast_dtype, pick_device
from salmm.model.net import SalMM
from salmm.model.official import read_official

log = logging.getLogger("salmm.inference")

FROM_CHECKPOINT = object()
"""A CLIP option given as this is not given: :func:`resolve_clip` takes the checkpoint's."""



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
    """The CLIP options to use: each one the user ``given`` (missing or :data:`FROM_CHECKPOINT`
    when not), else what the checkpoint was trained with (``config``; the published ones for an official
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
        log.warning("%s", RANDOM_WARNING)
    return choice


@dataclass(frozen=True)
class Weights:
    """A checkpoint's trainable weights and what it says about itself, whatever its form.

    ``path``: as the user named it; ``resolved``: the local file or Hub folder; ``config``:
    the training options the CLIP choice and frame size come from (None: an official
    checkpoint, trained with the published CLIP at 256x256); ``kind``: "salmm-train" or
    "official" (where the weights came from); ``form``: "checkpoint" or "hub".
    """

    path: str
    resolved: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    kind: str
    form: str
    sha256: str
    epoch: int | None
    valid_loss: float | None
    dataset_version: str | None
    git_commit: str | None
    dataset: str | None = None


def read_weights(path: str) -> Weights:
    """The weights a ``--checkpoint`` names: our checkpoint file, an official one, a Hub folder
    or a Hub id (:func:`salmm.model.hub.resolve`); every key checked. BadInputError in one
    line naming it otherwise."""
    resolved = hub.resolve(path)
    if hub.is_pretrained_folder(resolved):
        state, meta = hub.read_pretrained(resolved)
        source = meta["source"]
        config = {**meta["clip"], "size": meta["size"],
                  "cached_clip": meta["trained_cached_clip"]}
        return Weights(path, resolved, state, config, source["kind"], "hub",
                       hub.weights_sha256(resolved), source.get("epoch"),
                       source.get("valid_loss"), meta.get("dataset_version"),
                       source.get("git_commit"), meta.get("dataset"))
    raw = load_checkpoint(resolved)
    weights = read_official(resolved)
    config = checkpoint_config(raw)
    return Weights(path, resolved, weights.state_dict, config,
                   "salmm-train" if config is not None else "official", "checkpoint",
                   file_sha256(resolved), weights.epoch, weights.valid_loss,
                   raw.get("dataset_version"), raw.get("git_commit"))


def load_model(path: str, *, inline_clip: bool, given_clip: dict[str, Any],
               device: str | None = None, amp: str = "off") -> LoadedModel:
    """Load the checkpoint ``path`` names (ours, official, a Hub folder or id; every key
    checked: :func:`read_weights`) into a SalMM on ``device``.

    ``inline_clip``: attach the frozen CLIP encoder (built from :func:`resolve_clip`'s choice)
    so the model embeds frames itself; otherwise embeddings are passed in. BadInputError (one
    line naming the file) for a missing, unreadable or mismatching checkpoint.
    """
    path = str(path)
    weights = read_weights(path)
    config = weights.config
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
        "sha256": weights.sha256,
        "kind": weights.kind,
        "form": weights.form,
        "epoch": weights.epoch,
        "valid_loss": weights.valid_loss,
        "dataset_version": weights.dataset_version,
        "git_commit": weights.git_commit,
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
