"""Decode camera frames and gaze maps exactly as the published loaders do.

* Camera frames: the SalM² loaders read them with ``imageio.imread`` (Pillow underneath).
  :func:`decode_rgb` gives the same pixels: greyscale and YCbCr JPEG files go through
  OpenCV's libjpeg-turbo decoder (the same library and integer IDCT as Pillow's, bit-exact
  with it and about 3x faster here), everything else (PNG, CMYK JPEG, ...) through Pillow.
* BDDA gaze maps: read with ``cv2.imread(path, 0)``; :func:`decode_gray` runs the same
  OpenCV decoder on the file's bytes.

Both refuse missing, corrupt or truncated files with a one-line
:class:`~pipeline.errors.BadInputError`. OpenCV silently returns a grey-padded image for
a truncated JPEG, so JPEG data is also required to end with the end-of-image marker.

:func:`decode_reduced_bytes` is the ``--profile fast`` decoder: JPEG files decoded at a reduced DCT
scale (1/2, 1/4 or 1/8), still at least the requested size.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import BadInputError

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
# start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                       0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_CV_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION  # imageio does not rotate by EXIF
_CV_GRAY = cv2.IMREAD_GRAYSCALE
_CV_REDUCED = {  # DCT scale denominator -> flags, per output mode
    "RGB": {1: _CV_RGB, 2: _CV_RGB | cv2.IMREAD_REDUCED_GRAYSCALE_2,  # the reduction bits,
            4: _CV_RGB | cv2.IMREAD_REDUCED_GRAYSCALE_4,  # with RGB instead of grey output
            8: _CV_RGB | cv2.IMREAD_REDUCED_GRAYSCALE_8},
    "L": {1: _CV_GRAY, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
          8: cv2.IMREAD_REDUCED_GRAYSCALE_8},
}


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file, checked to be a complete image. The ``*_bytes`` decoders
    take them, so a caller that also hashes the file reads it once.

    Raises:
        BadInputError: the file is missing, unreadable or empty, or is JPEG data without its
            end-of-image marker (truncated).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadInputError(path, "missing image file") from None
    except OSError as err:
        raise BadInputError(path, f"cannot read image file ({err.strerror})") from None
    if not data:
        raise BadInputError(path, "empty image file")
    check_complete(data, path)
    return data


def check_complete(data: bytes, where: str | os.PathLike[str]) -> None:
    """Raise BadInputError(where, ...) for JPEG data without its end-of-image marker."""
    if data.startswith(_JPEG_START) and not data.rstrip(b"\x00").endswith(_JPEG_END):
        raise BadInputError(where, "truncated JPEG (no end-of-image marker)")


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(components, height, width) from a JPEG's start-of-frame segment, or None when the
    data is not a JPEG with a readable frame header (the decoders then report the problem)."""
    if not data.startswith(_JPEG_START):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 10 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return data[pos + 9], height, width
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        pos += 2 + length
    return None


def _cv_decode(where: str | os.PathLike[str], data: bytes, flags: int) -> np.ndarray:
    """OpenCV's decode of ``data`` with ``flags``; BadInputError naming ``where`` if it fails."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if image is None:
        raise BadInputError(where, "corrupt image (OpenCV cannot decode it)")
    return image


def decode_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a camera frame.

    Returns:
        uint8 ``[H, W, 3]`` RGB, identical to ``imageio.imread`` of a colour JPEG (Pillow's
        decoder, no EXIF rotation); greyscale or palette files are converted to RGB.

    Raises:
        BadInputError: missing, empty, corrupt or truncated file.
    """
    return decode_rgb_bytes(read_image_bytes(path), path)


def decode_rgb_bytes(data: bytes, where: str | os.PathLike[str]) -> np.ndarray:
    """:func:`decode_rgb` of an image already in memory (a shard's ``jpg``); ``where`` names it
    in the BadInputError raised for corrupt or truncated data."""
    check_complete(data, where)
    header = jpeg_header(data)
    if header is not None and header[0] in (1, 3):
        return _cv_decode(where, data, _CV_RGB)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadInputError(where, f"corrupt image ({err})") from None


def decode_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a gaze map as ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` does.

    Returns:
        uint8 ``[H, W]``, values 0..255.

    Raises:
        BadInputError: missing, empty, corrupt or truncated file.
    """
    return decode_gray_bytes(read_image_bytes(path), path)


def decode_gray_bytes(data: bytes, where: str | os.PathLike[str]) -> np.ndarray:
    """:func:`decode_gray` of an image already in memory; ``where`` names it in errors."""
    check_complete(data, where)
    return _cv_decode(where, data, _CV_GRAY)


def decode_reduced_bytes(data: bytes, where: str | os.PathLike[str], size: tuple[int, int],
                         mode: str) -> np.ndarray:
    """The fast profile's decoder: uint8 ``[h, w, 3]`` RGB (mode "RGB") or ``[h, w]`` grey
    (mode "L"), a JPEG decoded at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) whose result is
    still at least ``size`` (height, width). Other images are decoded in full, as
    :func:`decode_rgb_bytes` / :func:`decode_gray_bytes` do.

    Raises:
        BadInputError: empty, corrupt or truncated data (naming ``where``).
    """
    header = jpeg_header(data)
    if header is None or header[0] not in (1, 3):
        return decode_rgb_bytes(data, where) if mode == "RGB" else decode_gray_bytes(data, where)
    check_complete(data, where)
    _, height, width = header
    scale = max((s for s in (8, 4, 2, 1)
                 if -(-height // s) >= size[0] and -(-width // s) >= size[1]), default=1)
    return _cv_decode(where, data, _CV_REDUCED[mode][scale])

