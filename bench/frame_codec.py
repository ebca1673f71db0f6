"""What the frame codecs cost: bytes per 256x256 frame, decode time, and exactness.

Run: ``python -m bench.frame_codec [--frames 32]``

Frames: the synthetic TrafficGaze and BDDA frames of ``python -m pipeline synth`` and the real
photographs matplotlib ships (no driving data can be downloaded here), each resized as the
authors' loader resizes (``cv2.resize`` INTER_CUBIC to 256x256). Codecs: PNG at zlib levels
1 (salmm's) and 6, JPEG quality 95 (``--frame-codec jpeg95``), raw uint8. For each: mean
bytes per frame, the projected size of BDDA's train split (286,251 frames), mean decode
milliseconds with the decoder the loader uses, and the largest pixel difference from the
loader's array (0 means exact).
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from matplotlib import cbook
from PIL import Image

from pipeline.datasets.synthetic import write_dataset
from pipeline.formats.images import decode_rgb, decode_rgb_bytes
from pipeline.formats.shards import encode_jpeg

log = logging.getLogger("bench.frame_codec")
BDDA_TRAIN = 286_251
PHOTOS = ("grace_hopper.jpg",)


def png(rgb: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=level, optimize=False)
    return buf.getvalue()


CODECS = {"png level 1 (default)": lambda rgb: png(rgb, 1),
          "png level 6": lambda rgb: png(rgb, 6),
          "jpeg95": encode_jpeg,
          "raw uint8": lambda rgb: rgb.tobytes()}


def frames(count: int) -> dict[str, list[np.ndarray]]:
    """256x256 frames as the loader makes them, by source."""
    out: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, folder in (("trafficgaze", "trafficframe"), ("bdda", "camera_frames")):
            root = write_dataset(dataset, Path(tmp) / dataset, videos=2, frames=count // 2 + 5)
            paths = sorted((root / folder).rglob("*.jpg"))[:count]
            out[f"synthetic {dataset}"] = [cv2.resize(decode_rgb(p), (256, 256),
                                                      interpolation=cv2.INTER_CUBIC)
                                           for p in paths]
    photos = []
    for name in PHOTOS:
        with cbook.get_sample_data(name) as f:
            rgb = np.asarray(Image.open(f).convert("RGB"))
        h, w = rgb.shape[:2]
        for y, x in ((0, 0), (h // 4, w // 4), (h - min(h, w), w - min(h, w))):  # three crops
            crop = rgb[y:y + min(h, w) // 2 * 2, x:x + min(h, w) // 2 * 2]
            photos.append(cv2.resize(crop, (256, 256), interpolation=cv2.INTER_CUBIC))
    out["photographs (matplotlib)"] = photos
    return out


def decode(codec: str, data: bytes) -> np.ndarray:
    if codec == "raw uint8":
        return np.frombuffer(data, np.uint8).reshape(256, 256, 3)
    return decode_rgb_bytes(data, codec, expect=(256, 256))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32, help="synthetic frames per dataset")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.ERROR)
    for source, images in frames(opts.frames).items():
        log.info("%s: %d frames", source, len(images))
        for codec, encode in CODECS.items():
            blobs = [encode(rgb) for rgb in images]
            times, worst = [], 0
            for rgb, blob in zip(images, blobs):
                start = time.perf_counter()
                back = decode(codec, blob)
                times.append(time.perf_counter() - start)
                worst = max(worst, int(np.abs(back.astype(int) - rgb).max()))
            size = statistics.mean(len(b) for b in blobs)
            log.info("  %-22s %7.1f kB/frame  BDDA train %5.1f GB  decode %5.2f ms  max |diff|"
                     " %d", codec, size / 1e3, size * BDDA_TRAIN / 1e9,
                     1e3 * statistics.median(times), worst)


if __name__ == "__main__":
    main()
