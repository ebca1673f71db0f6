"""What a training run depends on: :class:`TrainConfig` (stored in every checkpoint), the fields
a resumed run must share (:data:`RECIPE_FIELDS`), and the choices its options offer.

Defaults follow the published recipe: Adam, lr 1e-3, weight decay 1e-4, batch 32, 256x256 frames,
seed 42, 100 epochs, float32, a fresh permutation of the training split every epoch. Imports
nothing heavy, so command lines can show these defaults at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.encoders.clip_spec import DEFAULT_MODEL, DEFAULT_PROFILE, DEFAULT_WEIGHTS, ClipSpec

ORDERS = ("permutation", "stream")
"""Training sample orders: a permutation per epoch by random access (published), or streamed
shards through a shuffle buffer."""
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DEFAULT_TRAIN_THREADS = 1
"""CPU intra-op threads of a run without ``--threads``: fixed, so the numbers never depend on
the machine's load at start; one thread also never waits for a core that another process
holds (the data workers decode on the other cores)."""


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


RECIPE_FIELDS = ("cached_clip", "batch_size", "lr", "weight_decay", "seed", "size", "order",
                 "shuffle_buffer", "clip_model", "clip_pretrained", "profile", "amp")
