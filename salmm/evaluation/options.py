"""What the evaluation commands are asked to do: their options dataclasses and the choices
their command lines offer (importing this module imports nothing heavy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASELINES = ("center", "mean", "uniform")


@dataclass(frozen=True)
class EvalOptions:
    """What ``python -m salmm.evaluate`` was asked to do (``checkpoint`` or ``baseline``)."""

    checkpoint: str | None
    prepared: str
    out: str
    baseline: str | None = None
    seeds: int = 1
    bootstrap: int = 0
    split: str = "test"
    export_mat: str | None = None
    cached_clip: bool = False
    cache: str | None = None
    batch_size: int = 16
    workers: int = 0
    dask_address: str | None = None
    seed: int = 0
    jitter: bool = True
    device: str | None = None
    amp: str = "off"
    clip: tuple[tuple[str, Any], ...] = ()      # given CLIP options (see given_clip_options)


@dataclass(frozen=True)
class CompareOptions:
    """What ``python -m salmm.compare`` was asked to do."""

    prepared: tuple[str, ...]
    out: str
    checkpoint: tuple[str, ...] = ()
    baseline: tuple[str, ...] = ()
    split: str = "test"
    cached_clip: bool = False
    seeds: int = 1
    seed: int = 0
    bootstrap: int = 0
    workers: int = 0
    device: str | None = None


ENGINES = ("auto", "octave", "matlab")


@dataclass(frozen=True)
class CertifyOptions:
    export: str
    official_metrics: str
    root: str | None = None
    engine: str = "auto"
    timeout_s: float = 24 * 3600
