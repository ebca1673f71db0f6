"""Frozen CLIP image encoder (open_clip) with the two preprocessing profiles.

Shared by the embedding cache and by :class:`salmm.model.SalMM`'s inline mode, so a cached
embedding and an inline one are the same numbers for the same frame and weights.

Profiles (input: float RGB frames [B, 3, H, W] in [0, 1]):

* ``"salmm"`` - the published SalM^2 preprocessing: ``torchvision`` resize to 224 x 224
  (bilinear, antialias on), **no** CLIP mean/std normalisation (the authors fed the [0, 1]
  frame straight into ``encode_image``).
* ``"openclip"`` - the model's own normalisation: resize to its image size with its
  interpolation (antialias on; the frame is squashed to a square, not centre-cropped), then
  its mean/std.

The published backbone is ViT-B/32 (the authors' README corrects the paper's "RN50x16"),
open_clip name ``"ViT-B-32"`` with ``pretrained="openai"``. Output: [B, 512] float32, the raw
(un-normalised) image embedding.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = ["PROFILES", "ClipEncoder", "build_clip_encoder", "weights_identity"]

log = logging.getLogger(__name__)

PROFILES = ("salmm", "openclip")
SALMM_SIZE = (224, 224)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ClipEncoder(nn.Module):
    """Frozen, always-eval CLIP image tower plus one preprocessing profile.

    visual: open_clip's image tower; size: (h, w) it is fed; interpolation: resize mode;
    mean, std: per-channel normalisation or None; identity: what produced the embeddings.
    """

    def __init__(self, visual, size, interpolation, mean, std, identity: dict):
        super().__init__()
        self.visual = visual
        self.size = tuple(size)
        self.interpolation = interpolation
        self.identity = dict(identity)
        if mean is None:
            self.mean = self.std = None
        else:
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ClipEncoder:
        """Stays in eval mode whatever the parent does (frozen encoder)."""
        return super().train(False)

    def preprocess(self, frames: Tensor) -> Tensor:
        """frames [B, 3, H, W] float in [0, 1] -> the encoder's input [B, 3, h, w]."""
        if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
            raise ValueError(
                f"CLIP encoder expects float frames [B, 3, H, W], got {tuple(frames.shape)} "
                f"{frames.dtype}"
            )
        if frames.numel() and (frames.min() < 0 or frames.max() > 1):
            raise ValueError("CLIP encoder expects frames scaled to [0, 1]")
        x = TF.resize(frames.float(), list(self.size), self.interpolation, antialias=True)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """frames [B, 3, H, W] in [0, 1] -> image embedding [B, 512] float32."""
        return self.visual(self.preprocess(frames)).float()


def weights_identity(pretrained: str | None, seed: int = 0) -> str:
    """How an encoder built with ``pretrained`` records its weights: the open_clip tag or
    ``hf-hub:`` name as given, ``"sha256:<hex>"`` of a local file, ``"random-seed<seed>"``."""
    if pretrained is None:
        return f"random-seed{seed}"
    if Path(pretrained).is_file():
        return "sha256:" + _sha256(Path(pretrained))
    return pretrained


def build_clip_encoder(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    profile: str = "salmm",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> ClipEncoder:
    """Build a frozen encoder via ``open_clip.create_model_and_transforms``.

    pretrained: an open_clip tag (``"openai"``), a local weight file, ``"hf-hub:org/repo"``
    (replaces model_name), or None for random weights drawn from ``seed`` (tests and smoke
    runs; logged as a warning). ``identity`` of the result: {"model", "weights" (see
    :func:`weights_identity`), "profile", "open_clip" (version), "embed_dim"}.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    hub = pretrained is not None and pretrained.startswith("hf-hub:")
    name, tag = (pretrained, None) if hub else (model_name, pretrained)
    weights = weights_identity(pretrained, seed)
    if pretrained is None:
        log.warning("CLIP %s: no pretrained weights, random initialisation (seed %d)", name, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    else:
        log.info("CLIP %s: loading weights %s (%s)", name, pretrained, weights)
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=tag)
    cfg = open_clip.get_model_preprocess_cfg(model)
    model_size = (
        tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
    )
    if profile == "salmm":
        if model_size != SALMM_SIZE:
            raise ValueError(f"profile 'salmm' feeds 224x224 frames; {name} expects {model_size}")
        size, interpolation, mean, std = SALMM_SIZE, InterpolationMode.BILINEAR, None, None
    else:
        size, mean, std = model_size, cfg["mean"], cfg["std"]
        interpolation = InterpolationMode(cfg.get("interpolation", "bicubic"))
    identity = {
        "model": name,
        "weights": weights,
        "profile": profile,
        "open_clip": open_clip.__version__,
        "embed_dim": int(model.visual.output_dim),
    }
    return ClipEncoder(model.visual, size, interpolation, mean, std, identity).to(device)
