"""What the prepared bytes depend on: the options of a normalize run and the versions of the
encoders and decoders that shape them (all of it goes into the manifest)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import cv2
import numpy as np
import PIL
from PIL import features

from pipeline.formats.shards import DEFAULT_FRAME_CODEC, FRAME_CODECS, JPEG_OPTIONS, PNG_OPTIONS

DECODES = ("faithful", "fast")
"""How camera frames and gaze maps are decoded (``--profile``; see :class:`Options`)."""
DEFAULT_SIZE = "256x256"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_BAD_FRACTION = 0.01


@dataclass(frozen=True)
class Options:
    """Everything the prepared bytes depend on (all of it goes into the manifest).

    ``size``: (height, width) of the prepared frame and label, pixels.
    ``frame_codec``: how frames are stored: "png" (default), losslessly, the exact array the
    published loader feeds the network; "jpeg95", JPEG quality 95, about 4x smaller and a few
    grey levels off (the model is sensitive to that: data/README.md has the numbers).
    ``shard_size``: split entries per shard (a shard holds fewer samples if frames are skipped).
    ``decode``: "faithful" decodes the full frame as the published loader does; "fast" lets the
    JPEG decoder downscale by a power of two (DCT scaling, Pillow draft mode) to no less than
    ``size`` first — faster, a few grey levels different (bench/prepare.py reports how much).
    ``ground_truth``: for the datasets with a choice of gaze maps (DR(eye)VE, DADA-2000), the
    one the labels are made from (recorded); None for the others.
    """

    size: tuple[int, int] = (256, 256)
    shard_size: int = DEFAULT_SHARD_SIZE
    decode: str = "faithful"
    frame_codec: str = DEFAULT_FRAME_CODEC
    ground_truth: str | None = None

    def __post_init__(self) -> None:
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if self.frame_codec not in FRAME_CODECS:
            raise ValueError(f"frame codec must be one of {sorted(FRAME_CODECS)}, got"
                             f" {self.frame_codec!r}")

    def manifest_entry(self) -> dict[str, Any]:
        height, width = self.size
        return {
            "size": {"height": height, "width": width},
            "shard_size": self.shard_size,
            "profile": self.decode,      # the manifest's name for it, since format 1
            "resize": "cv2.resize INTER_CUBIC on uint8 RGB",
            "frame": ({"codec": "png", "encoder": "pillow", **PNG_OPTIONS}
                      if self.frame_codec == "png" else
                      {"codec": "jpeg95", "encoder": "pillow", **JPEG_OPTIONS,
                       "subsampling": "4:4:4"}),
            # recorded text, hashed into the version id: the names are those of format 2's
            # first release (now pipeline.formats.labels); changing them changes every id
            "label": {
                "fixations": "float64 as recorded; label = pipeline.labels.fixation_label of"
                             " loader_points, computed when read",
                "gaze_map": "pipeline.labels.gaze_map_resized, 8-bit PNG; label = value / 255",
            },
            "key": "v{video:04d}_f{frame:06d}",
        } | ({} if self.ground_truth is None else {"ground_truth": self.ground_truth})




def pipeline_entry() -> dict[str, Any]:
    """The pipeline's version and the versions of the encoders/decoders that shape the bytes."""
    try:
        salmm = package_version("salmm")
    except PackageNotFoundError:
        salmm = "unknown"
    return {"name": "salmm", "version": salmm, "encoders": {
        "pillow": PIL.__version__,
        "libjpeg": str(features.version("jpg")),
        "zlib": str(features.version("zlib")),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }}
