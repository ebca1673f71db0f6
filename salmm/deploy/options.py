"""What the deployment commands are asked to do: their options dataclasses and the defaults
their command lines show (importing this module imports nothing heavy)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salmm.render.style import DEFAULT_ALPHA, DEFAULT_COLORMAP

DEFAULT_OPSET = 17
EXPORT_BACKEND = "export"
"""Mamba backend the network is traced with (:func:`salmm.model.scan.selective_scan_export`)."""


@dataclass(frozen=True)
class ExportOptions:
    """What ``python -m salmm.export`` was asked to do."""

    checkpoint: str
    out: str
    opset: int = DEFAULT_OPSET
    size: tuple[int, int] | None = None
    device: str | None = None
    amp: str = "off"
    clip: tuple[tuple[str, Any], ...] = ()
    backend: str = EXPORT_BACKEND
    """Mamba backend to trace with; only the tests pick another (to see a frozen scan refused)."""
    clip_int8: str | None = None
    """A video or folder of the user's frames: also write ``clip-int8.onnx`` (weights quantised
    to int8) when its embeddings' cosine to the float32 graph's is >= :data:`INT8_COSINE` on
    every one of (up to :data:`INT8_FRAMES` of) them."""


INT8_COSINE = 0.99
INT8_FRAMES = 64


BACKENDS = ("torch", "onnx")
EXPORT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "salmm" / "onnx"
"""Where the onnx backend keeps the exports it makes when no ``--onnx DIR`` is given."""
STREAM_FPS = 30.0


@dataclass(frozen=True)
class StreamOptions:
    """What ``python -m salmm.stream`` was asked to do."""

    checkpoint: str
    input: str
    out: str | None = None
    refresh_every: int = 1
    backend: str = "torch"
    onnx: str | None = None
    show: bool = False
    limit: int | None = None
    size: tuple[int, int] | None = None
    fps: float | None = None
    colormap: str = DEFAULT_COLORMAP
    alpha: float = DEFAULT_ALPHA
    allow_short_video: bool = False
    threads: int | None = None
    device: str | None = None
    amp: str = "off"
    clip: tuple[tuple[str, Any], ...] = ()
    clip_int8: bool = False
    """onnx backend: CLIP from the export's ``clip-int8.onnx`` (``export --clip-int8``)."""


PICTURES_FPS = 10.0


@dataclass(frozen=True)
class PredictOptions:
    """What ``python -m salmm.predict`` was asked to do."""

    checkpoint: str
    input: str
    out: str
    split: str = "test"
    limit: int | None = None
    fps: float | None = None
    size: tuple[int, int] | None = None
    cached_clip: bool = False
    cache: str | None = None
    batch_size: int = 8
    colormap: str = DEFAULT_COLORMAP
    alpha: float = DEFAULT_ALPHA
    animation: str = "auto"
    allow_short_video: bool = False
    device: str | None = None
    amp: str = "off"
    clip: tuple[tuple[str, Any], ...] = ()
