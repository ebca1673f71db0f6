"""Frames from outside the pipeline, for ``salmm.predict`` and ``salmm.stream``: image files, a
folder of them, a video file, a camera and an MJPEG byte stream (``-``: standard input).

Every source yields :class:`Item` in order, each frame as decoded (uint8 RGB [H, W, 3]) and
resized for the model as ``python -m pipeline normalize`` resizes frames
(:func:`pipeline.formats.images.resize_frame`: ``cv2.resize(INTER_CUBIC)``). Decoding is strict: a corrupt image or
JPEG in the stream is a BadInputError naming it, never a silently grey frame.

* :func:`image_items` - image files (:func:`folder_images`: a folder's, in name order);
* :func:`video_items` - a video file or a camera opened with :func:`open_video` /
  :func:`open_camera`; a file that ends before the frames its container announces is refused
  (or, when allowed, read as far as it goes, with a warning);
* :func:`mjpeg_items` - concatenated JPEG images (``ffmpeg -f mjpeg -``, most network and USB
  cameras' "MJPEG" mode), split by :func:`split_mjpeg`, which walks the JPEG segment structure
  rather than searching for end markers (an embedded EXIF thumbnail has one of its own).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from pipeline.core.errors import BadInputError
from pipeline.formats.images import decode_rgb, decode_rgb_bytes, resize_frame

log = logging.getLogger("salmm.data.sources")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MAX_JPEG_BYTES = 64 << 20
"""Largest single image :func:`split_mjpeg` accepts (a 64-megapixel JPEG is far smaller): a
stream that never closes its image is refused instead of filling memory."""
READ_BYTES = 1 << 16


@dataclass
class Item:
    """One frame to predict: output ``name`` (file stem), ``frame`` uint8 RGB [H, W, 3] as shown,
    ``model_input`` uint8 RGB [h, w, 3] at the model's size, the ground truth ``label`` float
    [h, w] (prepared inputs), and the sample ``key`` and ``index`` in its split (for cached
    embeddings)."""

    name: str
    frame: np.ndarray
    model_input: np.ndarray
    label: np.ndarray | None = None
    key: str | None = None
    index: int | None = None


def network_input(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [h, w, 3] -> float32 [1, 3, h, w] in [0, 1], what the network and CLIP take."""
    return np.ascontiguousarray(frame.transpose(2, 0, 1)[None], dtype=np.float32) / 255


def folder_images(path: str) -> list[Path]:
    """The image files directly in folder ``path``, by name; BadInputError if there are none."""
    files = sorted(f for f in Path(path).iterdir()
                   if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInputError(path, f"no frames here (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def image_items(files: Sequence[Path], size: tuple[int, int]) -> Iterator[Item]:
    """Frames decoded in full (:func:`pipeline.formats.images.decode_rgb`) and resized for the model."""
    for f in files:
        rgb = decode_rgb(f)
        yield Item(f.stem, rgb, resize_frame(rgb, size))


def open_video(path: str) -> tuple[cv2.VideoCapture, float | None, int | None]:
    """(capture, frames per second or None, frame count or None); BadInputError when OpenCV
    cannot open ``path`` as a video."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise BadInputError(path, "cannot be read as a video (or an image: use .jpg, .jpeg,"
                            " .png or .bmp)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    return capture, (fps if fps > 0 else None), (count if count > 0 else None)


def open_camera(index: int) -> tuple[cv2.VideoCapture, float | None]:
    """(capture, frames per second or None) of camera ``index``; BadInputError naming it when
    OpenCV cannot open it."""
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        raise BadInputError(f"camera {index}", "cannot be opened (no such device, or it is in"
                            " use)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    return capture, (fps if fps > 0 else None)


def video_items(path: str, capture: cv2.VideoCapture, size: tuple[int, int],
                expected: int | None = None, allow_short: bool = False) -> Iterator[Item]:
    """The video's frames in order (RGB), resized for the model.

    Raises:
        BadInputError: the video has no readable frames, or it ends before the ``expected``
            frames its container announces (damaged or truncated) unless ``allow_short``, which
            logs how many were read instead.
    """
    number = 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            number += 1
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield Item(f"frame_{number:06d}", rgb, resize_frame(rgb, size))
    finally:
        capture.release()
    if number == 0:
        raise BadInputError(path, "the video has no readable frames")
    if expected is not None and number < expected:
        if not allow_short:
            raise BadInputError(path, f"ended after {number} of the {expected} frames it"
                                " announces (damaged or truncated); --allow-short-video uses"
                                " the frames that could be read")
        log.warning("%s: read %d of the %d frames it announces: the file ended early", path,
                    number, expected)


# ---- MJPEG ---------------------------------------------------------------------------------------

_STANDALONE = {0x01, 0xD8} | set(range(0xD0, 0xD8))  # TEM, SOI, RST0-7: no length field


class _Reader:
    """Bytes of a binary stream, read ahead in blocks, consumed one JPEG image at a time."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.buf, self.eof = stream, bytearray(), False

    def fill(self, upto: int) -> bool:
        """Whether ``buf[upto - 1]`` exists, reading more as needed."""
        while len(self.buf) < upto and not self.eof:
            block = self.stream.read(READ_BYTES)
            if not block:
                self.eof = True
            else:
                self.buf += block
        return len(self.buf) >= upto

    def byte(self, at: int) -> int | None:
        return self.buf[at] if self.fill(at + 1) else None

    def take(self, end: int) -> bytes:
        image = bytes(self.buf[:end])
        del self.buf[:end]
        return image


def _image_end(reader: _Reader, where: str) -> int | None:
    """Offset just past the EOI of the JPEG image starting at ``reader.buf[0]`` (its SOI),
    walking marker segments by their lengths and entropy-coded data for markers; None when the
    stream ends inside the image."""
    at = 2
    while True:
        if at > MAX_JPEG_BYTES:
            raise BadInputError(where, f"no end of image in {MAX_JPEG_BYTES >> 20} MB: not an"
                                " MJPEG stream, or a damaged one")
        first, marker = reader.byte(at), reader.byte(at + 1)
        if first is None or marker is None:
            return None
        if first != 0xFF:
            raise BadInputError(where, f"corrupt JPEG (no marker at byte {at} of the image)")
        if marker == 0xFF:                                   # fill byte before a marker
            at += 1
            continue
        if marker == 0xD9:                                   # EOI
            return at + 2
        at += 2
        if marker in _STANDALONE:
            continue
        high, low = reader.byte(at), reader.byte(at + 1)
        if high is None or low is None:
            return None
        at += (high << 8) | low                              # the segment, length included
        if marker != 0xDA:                                   # SOS: entropy-coded data follows
            continue
        while True:                                          # to the next real marker
            found = reader.buf.find(0xFF, at)
            if found < 0:
                at = len(reader.buf)
                if not reader.fill(at + 1):
                    return None
                continue
            at = found
            following = reader.byte(at + 1)
            if following is None:
                return None
            if following == 0x00 or 0xD0 <= following <= 0xD7:   # stuffed byte, restart
                at += 2
                continue
            break


def split_mjpeg(stream: BinaryIO, where: str = "stdin") -> Iterator[bytes]:
    """The JPEG images of an MJPEG byte stream, each from SOI to EOI, as they arrive.

    Bytes between images are skipped (some cameras send multipart headers between them); a
    stream that ends inside an image, or an image whose structure is broken, is a
    BadInputError naming ``where`` and the image's number.
    """
    reader = _Reader(stream)
    number = 0
    while True:
        skipped = 0
        start = reader.buf.find(b"\xff\xd8")
        while start < 0:
            keep = 1 if reader.buf.endswith(b"\xff") else 0     # maybe half an SOI
            skipped += len(reader.buf) - keep
            del reader.buf[:len(reader.buf) - keep]
            if not reader.fill(keep + 1):
                skipped += len(reader.buf)
                if skipped:
                    log.warning("%s: %d bytes after image %d are not an image", where, skipped,
                                number)
                return
            start = reader.buf.find(b"\xff\xd8")
        del reader.buf[:start]
        number += 1
        end = _image_end(reader, f"{where} image {number}")
        if end is None:
            raise BadInputError(f"{where} image {number}", "the stream ended inside the image"
                                " (truncated)")
        yield reader.take(end)


def mjpeg_items(stream: BinaryIO, size: tuple[int, int], where: str = "stdin"
                ) -> Iterator[Item]:
    """The frames of an MJPEG stream, decoded strictly and resized for the model; BadInputError
    naming the image for a corrupt one, or when the stream holds no image at all."""
    number = 0
    for number, data in enumerate(split_mjpeg(stream, where), 1):
        rgb = decode_rgb_bytes(data, f"{where} image {number}")
        yield Item(f"frame_{number:06d}", rgb, resize_frame(rgb, size))
    if number == 0:
        raise BadInputError(where, "no JPEG image in the stream (expected MJPEG: concatenated"
                            " JPEG files, e.g. ffmpeg -f mjpeg -)")
