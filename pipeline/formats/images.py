"""Decode camera frames and gaze maps exactly as the published loaders do - and refuse
anything else.

* Camera frames: the SalM² loaders read them with ``imageio.imread`` (Pillow underneath).
  :func:`decode_rgb` gives the same pixels: greyscale and YCbCr JPEG files go through
  libjpeg-turbo (``simplejpeg``: the same library and integer IDCT as Pillow's, bit-exact with
  it and a little faster), everything else (PNG, CMYK JPEG, ...) through Pillow.
* BDDA gaze maps: read with ``cv2.imread(path, 0)``; :func:`decode_gray` runs libjpeg-turbo's
  greyscale decode on a JPEG's bytes (bit-exact with OpenCV's), OpenCV's on anything else.

Every decoder refuses, with a one-line :class:`~pipeline.core.errors.BadInputError` naming the file,
a missing, empty, truncated or corrupt file - **a decoder warning is an error**: libjpeg
"recovers" from damaged entropy-coded data by inventing pixels, and the published loader's
Pillow refuses such files ("broken data stream"), so JPEG data is decoded strictly and is also
required to end with its end-of-image marker. Before any pixel is decoded the header's size is
checked: against the size the caller expects (``expect``: a dataset's frames, a prepared
dataset's samples), against an upper bound (``bound``), and always against :data:`MAX_PIXELS`,
so a header that claims 30000x30000 costs nothing and allocates nothing.

:func:`decode_reduced_bytes` is the ``--profile fast`` decoder: JPEG files decoded at a reduced
DCT scale (1/2, 1/4 or 1/8), still at least the requested size.
"""

from __future__ import annotations

import io
import os
import warnings

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import BadInputError

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 64 * 1024 * 1024
"""Largest image any decoder here will allocate (height x width; 8192 x 8192, more than an 8K
video frame)."""
Image.MAX_IMAGE_PIXELS = MAX_PIXELS     # Pillow refuses bigger images (DecompressionBombError)
# start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                       0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
               Image.DecompressionBombWarning)


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


def image_size(data: bytes, where: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) an image's header declares, read without decoding any pixel.

    Raises:
        BadInputError: not an image Pillow or libjpeg can read the header of.
    """
    header = jpeg_header(data)
    if header is not None:
        return header[1], header[2]
    if data.startswith(_PNG_START) and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.height, image.width
    except _PIL_ERRORS as err:
        raise BadInputError(where, f"corrupt image ({_pil_problem(err)})") from None


def check_size(data: bytes, where: str | os.PathLike[str], *,
               expect: tuple[int, int] | None = None,
               bound: tuple[int, int] | None = None) -> tuple[int, int]:
    """The header's (height, width), checked before decoding: equal to ``expect`` when given, at
    most ``bound`` (height, width) when given, and never more than :data:`MAX_PIXELS`.

    Raises:
        BadInputError: an unreadable header or a size out of line (naming both sizes).
    """
    return check_dimensions(image_size(data, where), where, expect=expect, bound=bound)


def check_dimensions(size: tuple[int, int], where: str | os.PathLike[str], *,
                     expect: tuple[int, int] | None = None,
                     bound: tuple[int, int] | None = None) -> tuple[int, int]:
    """:func:`check_size` of a (height, width) already read from a header (a video's)."""
    height, width = size
    if expect is not None and (height, width) != tuple(expect):
        raise BadInputError(where, f"is {width}x{height}, expected {expect[1]}x{expect[0]}"
                            " (width x height)")
    if bound is not None and (height > bound[0] or width > bound[1]):
        raise BadInputError(where, f"is {width}x{height}, larger than the {bound[1]}x{bound[0]}"
                            " allowed here (width x height)")
    if height * width > MAX_PIXELS or min(height, width) < 1:
        raise BadInputError(where, f"is {width}x{height}: not a size salmm decodes (at most"
                            f" {MAX_PIXELS} pixels)")
    return height, width


def _pil_problem(err: BaseException) -> str:
    """Pillow's complaint without what varies from run to run (object reprs, addresses)."""
    if isinstance(err, UnidentifiedImageError):
        return "Pillow cannot identify the format"
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"more than {MAX_PIXELS} pixels"
    return f"{type(err).__name__}: {err}"


def _jpeg_decode(where: str | os.PathLike[str], data: bytes, colorspace: str,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """libjpeg-turbo's strict decode (a warning raises) to "RGB" [H, W, 3] or "GRAY" [H, W];
    ``size``: decode at the smallest DCT scale whose result is at least that (height, width)."""
    low_h, low_w = size or (0, 0)
    try:
        image = simplejpeg.decode_jpeg(data, colorspace, min_height=low_h, min_width=low_w,
                                       strict=True)
    except ValueError as err:
        raise BadInputError(where, f"corrupt JPEG ({err})") from None
    return image[..., 0] if colorspace == "GRAY" else image


def decode_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a camera frame.

    Returns:
        uint8 ``[H, W, 3]`` RGB, identical to ``imageio.imread`` of a colour JPEG (Pillow's
        decoder, no EXIF rotation); greyscale or palette files are converted to RGB.

    Raises:
        BadInputError: missing, empty, corrupt or truncated file.
    """
    return decode_rgb_bytes(read_image_bytes(path), path)


def decode_rgb_bytes(data: bytes, where: str | os.PathLike[str], *,
                     expect: tuple[int, int] | None = None,
                     bound: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`decode_rgb` of an image already in memory (a shard's ``jpg``); ``where`` names it
    in the BadInputError raised for corrupt, truncated or wrongly sized data (``expect`` /
    ``bound``: see :func:`check_size`)."""
    return _decode(data, where, "RGB", expect, bound)


def _decode(data: bytes, where: str | os.PathLike[str], mode: str,
            expect: tuple[int, int] | None, bound: tuple[int, int] | None) -> np.ndarray:
    """Checks, then the decode of mode "RGB" ([H, W, 3]) or "L" ([H, W]): libjpeg-turbo for
    greyscale and YCbCr JPEG data; otherwise Pillow (RGB, as imageio) or OpenCV (grey, as the
    published ``cv2.imread(path, 0)``)."""
    check_complete(data, where)
    check_size(data, where, expect=expect, bound=bound)
    header = jpeg_header(data)
    if header is not None and header[0] in (1, 3):
        return _jpeg_decode(where, data, "RGB" if mode == "RGB" else "GRAY")
    if mode == "L":
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise BadInputError(where, "corrupt image (OpenCV cannot decode it)")
        return image
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb)
    except _PIL_ERRORS as err:
        raise BadInputError(where, f"corrupt image ({_pil_problem(err)})") from None


def resize_frame(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> [height, width, 3] (``size``) as every prepared frame is resized:
    ``cv2.resize`` INTER_CUBIC (the published loader's); a frame of that size is returned as it is."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def decode_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a gaze map as ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` does.

    Returns:
        uint8 ``[H, W]``, values 0..255.

    Raises:
        BadInputError: missing, empty, corrupt or truncated file.
    """
    return decode_gray_bytes(read_image_bytes(path), path)


def decode_gray_bytes(data: bytes, where: str | os.PathLike[str], *,
                      expect: tuple[int, int] | None = None,
                      bound: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`decode_gray` of an image already in memory; ``where`` names it in errors
    (``expect`` / ``bound``: see :func:`check_size`)."""
    return _decode(data, where, "L", expect, bound)


def decode_reduced_bytes(data: bytes, where: str | os.PathLike[str], size: tuple[int, int],
                         mode: str, *, expect: tuple[int, int] | None = None,
                         bound: tuple[int, int] | None = None) -> np.ndarray:
    """The fast profile's decoder: uint8 ``[h, w, 3]`` RGB (mode "RGB") or ``[h, w]`` grey
    (mode "L"), a JPEG decoded at the smallest power-of-two DCT scale (1/1, 1/2, 1/4, 1/8)
    whose result is still at least ``size`` (height, width). Other images are decoded in full,
    as :func:`decode_rgb_bytes` / :func:`decode_gray_bytes` do.

    Raises:
        BadInputError: empty, corrupt, truncated or wrongly sized data (naming ``where``).
    """
    header = jpeg_header(data)
    if header is None or header[0] not in (1, 3):
        decode = decode_rgb_bytes if mode == "RGB" else decode_gray_bytes
        return decode(data, where, expect=expect, bound=bound)
    check_complete(data, where)
    height, width = check_size(data, where, expect=expect, bound=bound)
    scale = max((s for s in (8, 4, 2, 1)
                 if -(-height // s) >= size[0] and -(-width // s) >= size[1]), default=1)
    # libjpeg-turbo scales by M/8; asking for at least 1/scale of the size gets exactly 1/scale
    return _jpeg_decode(where, data, "RGB" if mode == "RGB" else "GRAY",
                        (-(-height // scale), -(-width // scale)))
