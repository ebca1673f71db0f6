"""A structural check of MATLAB v5 ``.mat`` files before SciPy parses them.

SciPy's v5 reader trusts the sizes written in a file: a damaged file - a bit flipped on disk in an
element's type or byte count - can make it read out of bounds and kill the process with a
segmentation fault (measured: an uncompressed cell array with 1% of its bytes flipped did), which
no ``except`` catches. :func:`check_v5` walks every data element first (the format: MathWorks,
"MAT-File Format", chapter 1) and raises :class:`~pipeline.core.errors.BadInputError` in one line
for anything inconsistent, so SciPy only ever sees files whose structure holds together:

* the 128-byte header, with version 0x0100 and the ``IM`` / ``MI`` endian mark;
* every element's data type is one the format defines; a small element (type and size packed
  in one word) holds at most 4 bytes; an element and its padding fit in what contains it;
* a compressed element inflates (at most :data:`MAX_INFLATED` bytes) to exactly one element;
* a matrix starts with its array flags, dimensions (non-negative) and name; a cell array holds
  exactly one matrix per cell; a numeric, logical or char array's real (and complex part's)
  data has exactly ``prod(dims) x item size`` bytes; other classes (structs, objects, sparse
  and function handles) are refused, since no dataset here stores them.
"""

from __future__ import annotations

import math
import struct
import zlib

from pipeline.core.errors import BadInputError

HEADER = 128
MAX_INFLATED = 1 << 30
"""Largest inflated size of one compressed element (a bound on what a file may claim)."""

MI_MATRIX, MI_COMPRESSED = 14, 15
ITEM_SIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8, 16: 1, 17: 2, 18: 4}
"""Bytes per item of each numeric / text data type (miINT8 .. miUTF32)."""
CELL, CHAR = 1, 4
NUMERIC_CLASSES = {4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
"""mxCHAR, mxDOUBLE .. mxUINT64: the classes stored as plain data (and logical, a uint8 flag)."""


class _Problem(Exception):
    pass


def check_v5(data: bytes, where: str) -> None:
    """Raise BadInputError naming ``where`` when ``data`` is not a structurally sound MATLAB v5
    file; return quietly otherwise (then SciPy's reader can be given it)."""
    try:
        _check(data)
    except _Problem as problem:
        raise BadInputError(where, f"corrupt or truncated MATLAB v5 file ({problem})") from None


def _check(data: bytes) -> None:
    if len(data) < HEADER:
        raise _Problem(f"{len(data)} bytes, shorter than the 128-byte header")
    mark = data[126:128]
    if mark not in (b"IM", b"MI"):
        raise _Problem("no endian mark in the header")
    order = "<" if mark == b"IM" else ">"
    if struct.unpack_from(order + "H", data, 124)[0] != 0x0100:
        raise _Problem("not a version 5 file")
    offset = HEADER
    while offset < len(data):
        offset = _element(data, offset, len(data), order, top=True)


def _tag(data: bytes, offset: int, end: int, order: str) -> tuple[int, int, int, int]:
    """(type, byte count, data start, next element) of the element at ``offset``."""
    if offset + 8 > end:
        raise _Problem(f"element tag at byte {offset} runs past its container")
    kind, count = struct.unpack_from(order + "II", data, offset)
    if kind >> 16:                                   # small element: size in the upper half
        small, kind = kind >> 16, kind & 0xFFFF
        if small > 4 or kind not in ITEM_SIZE:
            raise _Problem(f"bad small element at byte {offset}")
        return kind, small, offset + 4, offset + 8
    if kind != MI_MATRIX and kind != MI_COMPRESSED and kind not in ITEM_SIZE:
        raise _Problem(f"unknown data type {kind} at byte {offset}")
    stop = offset + 8 + count
    following = stop if kind == MI_COMPRESSED else stop + (-count) % 8
    if stop > end or following > end + 7:            # the last element's padding may be cut
        raise _Problem(f"element at byte {offset} claims {count} bytes, more than there are")
    return kind, count, offset + 8, min(following, end)


def _element(data: bytes, offset: int, end: int, order: str, top: bool = False) -> int:
    kind, count, start, following = _tag(data, offset, end, order)
    if kind == MI_COMPRESSED:
        if not top:
            raise _Problem(f"compressed element inside a matrix at byte {offset}")
        inflater = zlib.decompressobj()
        try:
            inner = inflater.decompress(data[start:start + count], MAX_INFLATED)
        except zlib.error as err:
            raise _Problem(f"compressed element at byte {offset}: {err}") from None
        if inflater.unconsumed_tail:
            raise _Problem(f"compressed element at byte {offset} inflates past {MAX_INFLATED}")
        if len(inner) < 8 or _element(inner, 0, len(inner), order) < len(inner) - 7:
            raise _Problem(f"compressed element at byte {offset} is not one element")
        return following
    if kind == MI_MATRIX:
        _matrix(data, start, start + count, order)
    elif top:
        raise _Problem(f"top-level element at byte {offset} is not a matrix")
    return following


def _sub(data: bytes, offset: int, end: int, order: str, want: set[int], what: str
         ) -> tuple[int, bytes, int]:
    kind, count, start, following = _tag(data, offset, end, order)
    if kind not in want:
        raise _Problem(f"{what} at byte {offset} has data type {kind}")
    return kind, data[start:start + count], following


def _matrix(data: bytes, start: int, end: int, order: str) -> None:
    if start == end:                                 # an empty matrix element
        return
    _, flags, offset = _sub(data, start, end, order, {6}, "array flags")
    if len(flags) != 8:
        raise _Problem(f"array flags at byte {start} are {len(flags)} bytes, not 8")
    word = struct.unpack_from(order + "I", flags)[0]
    klass, complex_ = word & 0xFF, bool(word & 0x800)
    _, dims, offset = _sub(data, offset, end, order, {5}, "dimensions")
    if len(dims) < 8 or len(dims) % 4:
        raise _Problem(f"dimensions at byte {start} are {len(dims)} bytes")
    shape = struct.unpack(order + f"{len(dims) // 4}i", dims)
    if min(shape) < 0:
        raise _Problem(f"negative dimension {shape} at byte {start}")
    items = math.prod(shape)
    _, _, offset = _sub(data, offset, end, order, {1}, "array name")
    if klass == CELL:
        for _ in range(items):
            kind, count, cell_start, offset = _tag(data, offset, end, order)
            if kind != MI_MATRIX:
                raise _Problem(f"a cell at byte {cell_start - 8} is not a matrix")
            _matrix(data, cell_start, cell_start + count, order)
    elif klass in NUMERIC_CLASSES:
        for part in ("real", "imaginary") if complex_ else ("real",):
            kind, count, part_start, offset = _tag(data, offset, end, order)
            if kind not in ITEM_SIZE or count != items * ITEM_SIZE[kind]:
                raise _Problem(f"{part} part at byte {part_start - 8} holds {count} bytes of"
                               f" type {kind} for {items} items")
    else:
        raise _Problem(f"unsupported MATLAB class {klass} at byte {start}")
    if offset < end - 7:
        raise _Problem(f"matrix at byte {start} has {end - offset} bytes after its data")
