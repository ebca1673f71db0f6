"""Decode camera frames and gaze maps exactly as the published loaders do.

* Camera frames: the SalM² loaders read them with ``imageio.imread`` (Pillow underneath);
  :func:`decode_rgb` decodes with Pillow directly, giving the same pixels.
* BDDA gaze maps: read with ``cv2.imread(path, 0)``; :func:`decode_gray` runs the same
  OpenCV decoder on the file's bytes.

Both refuse missing, corrupt or truncated files with a one-line
:class:`~pipeline.errors.BadInputError`. OpenCV silently returns a grey-padded image for
a truncated JPEG, so JPEG data is also required to end with the end-of-image marker.
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


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file, checked to be a complete image.

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
    if data.startswith(_JPEG_START) and not data.rstrip(b"\x00").endswith(_JPEG_END):
        raise BadInputError(path, "truncated JPEG (no end-of-image marker)")
    return data


def decode_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a camera frame.

    Returns:
        uint8 ``[H, W, 3]`` RGB, identical to ``imageio.imread`` of a colour JPEG (Pillow's
        decoder, no EXIF rotation); greyscale or palette files are converted to RGB.

    Raises:
        BadInputError: missing, empty, corrupt or truncated file.
    """
    data = read_image_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadInputError(path, f"corrupt image ({err})") from None


def decode_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a gaze map as ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` does.

    Returns:
        uint8 ``[H, W]``, values 0..255.

    Raises:
        BadInputError: missing, empty, corrupt or truncated file.
    """
    data = read_image_bytes(path)
    gray = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise BadInputError(path, "corrupt image (OpenCV cannot decode it)")
    return gray

