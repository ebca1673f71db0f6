"""Which CLIP encoder, without loading one: :class:`ClipSpec` (open_clip model name, weights,
preprocessing profile) and :meth:`ClipSpec.identity`, how caches, checkpoints and exports record
it; :func:`parse_weights`, the one parser of the weights option (``none`` = random weights); and
:func:`add_clip_options`, the one definition of the CLIP options of every command.

Importing this module does not import torch or open_clip (command lines parse their options
before the seconds those take); :func:`activation` imports open_clip when first called.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.fsio import file_fingerprint

PRECISION_NAMES = ("fp32", "bf16", "fp16")
"""Autocast choices of the encoder on CUDA (CPU always computes in float32)."""


DEFAULT_MODEL = "ViT-B-32"
DEFAULT_WEIGHTS = "openai"
DEFAULT_PROFILE = "salmm"
PROFILES = ("salmm", "openclip")
RANDOM_NOTE = "random CLIP weights: a smoke run"
"""What every output made with random CLIP weights says about itself."""
RANDOM_WARNING = (f"CLIP has RANDOM weights (--clip-pretrained none): {RANDOM_NOTE}, its outputs"
                  " mean nothing")
"""The one warning every command gives about random CLIP weights (said once a command)."""


def parse_weights(text: str | None) -> str | None:
    """The weights option as given on a command line, in a config file or a flow parameter:
    ``none`` (any case) or empty means random weights (None); anything else is kept (an
    open_clip tag, a local file, ``hf-hub:org/repo``)."""
    if text is None or not str(text).strip() or str(text).strip().lower() == "none":
        return None
    return str(text)


parse_weights.spell = lambda weights: "none" if weights is None else str(weights)
"""The weights as a configuration file writes them (None: random, "none")."""


def random_weights(pretrained: str | None) -> bool:
    """Whether ``pretrained`` (as parsed) or a recorded weights identity means random weights."""
    return pretrained is None or str(pretrained).startswith("random")


def weights_identity(pretrained: str | None, seed: int = 0) -> str:
    """How an encoder built with ``pretrained`` records its weights: the open_clip tag or
    ``hf-hub:`` name as given, ``"sha256:<hex>"`` of a local file, ``"random-seed<seed>"``."""
    if pretrained is None:
        return f"random-seed{seed}"
    if Path(pretrained).is_file():
        return "sha256:" + file_fingerprint(pretrained)[1]
    return pretrained


def activation(model: str, pretrained: str | None) -> str:
    """The MLP activation of the encoder of ``model`` with weights ``pretrained`` (as parsed):
    ``"quickgelu"`` when the weights were trained with it (OpenAI's, and any open_clip tag whose
    pretrained config says so), for a local file or random weights of the published model
    (the authors' OpenAI architecture), and for a model whose config says so; else ``"gelu"``.
    ``hf-hub:`` models carry their own config: ``"hub-config"``."""
    if pretrained is not None and pretrained.startswith("hf-hub:"):
        return "hub-config"
    import open_clip  # lazy: seconds to import; only an identity needs the configs

    config = open_clip.get_model_config(model) or {}
    tag = (open_clip.get_pretrained_cfg(model, pretrained) or {}) \
        if pretrained is not None and not Path(pretrained).exists() else {}
    published_file = model == DEFAULT_MODEL and (pretrained is None or Path(pretrained).exists())
    quick = config.get("quick_gelu") or tag.get("quick_gelu") or published_file
    return "quickgelu" if quick else "gelu"


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP encoder: open_clip model name, weights (tag, local file, ``hf-hub:`` name, or
    None for random weights) and preprocessing profile. Hashable."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_WEIGHTS
    profile: str = DEFAULT_PROFILE

    def identity(self) -> dict[str, str]:
        """{"model", "weights", "profile", "activation"} as caches and exports record them."""
        return {"model": self.model, "weights": weights_identity(self.pretrained),
                "profile": self.profile, "activation": self.activation}

    @property
    def activation(self) -> str:
        """The encoder's MLP activation (:func:`activation`)."""
        return activation(self.model, self.pretrained)

    @property
    def random(self) -> bool:
        return self.pretrained is None


PUBLISHED = ClipSpec()
"""The published encoder: ViT-B-32 with the OpenAI weights and the salmm profile (what the
authors' released checkpoints were trained with)."""


def add_clip_options(parser: argparse.ArgumentParser | Any, default: Any = PUBLISHED,
                     note: str = "") -> None:
    """--clip-model, --clip-pretrained, --profile in a "CLIP" group of ``parser``, defaulting to
    the :class:`ClipSpec` ``default`` (anything else, e.g. a marker meaning "the checkpoint's",
    is the default of all three; ``note`` then says what it means)."""
    spec = default if isinstance(default, ClipSpec) else None
    shown = (lambda value: f" (default {value})") if spec else (lambda value: note)
    group = parser.add_argument_group("CLIP")
    group.add_argument("--clip-model", default=spec.model if spec else default,
                       help="open_clip model name" + shown(spec and spec.model))
    group.add_argument("--clip-pretrained", type=parse_weights,
                       default=spec.pretrained if spec else default,
                       help="weights: an open_clip tag (downloaded once), a local weight file,"
                            " hf-hub:org/repo, or none for random weights (tests, offline smoke"
                            " runs)" + shown(spec and spec.pretrained))
    group.add_argument("--profile", choices=PROFILES, default=spec.profile if spec else default,
                       help="preprocessing: salmm = published (resize to 224, no mean/std),"
                            " openclip = the model's own transform" + shown(spec and spec.profile))
