"""Read and write the ``fixdata`` cell arrays of TrafficGaze and DrFixD-rainy, and the per-frame
fixation maps of DADA-2000.

Each video ``V`` of those datasets has ``fixdata/fixdata{V}.mat`` holding one MATLAB
variable, ``fixdata``: a cell array with one cell per frame, each cell an ``N x k``
double matrix of the fixations recorded on that frame (column 3 is the x / column and
column 4 the y / row coordinate, 1-based as in the source, in pixels of the
1280x720 frame). Downloads come in both MATLAB file formats:

* **v5** (``save -v7`` and older): read with :func:`scipy.io.loadmat`, once
  :func:`~pipeline.datasets.matcheck.check_v5` found its structure sound (SciPy can crash the
  process on a damaged file).
* **v7.3**: an HDF5 file behind a 512-byte MATLAB header. The cell is a dataset of
  object references into ``#refs#``; each referenced matrix is stored transposed
  (``k x N``) with a ``MATLAB_class`` attribute, and an empty cell is a small uint64
  dataset (its MATLAB dimensions) flagged with the ``MATLAB_empty`` attribute.

:func:`load_fixdata` turns either into a list of ``float64 [N, k]`` arrays.
:func:`write_fixdata` writes either format (used by the synthetic datasets and tests),
byte-for-byte deterministic for the same cells.

DADA-2000 keeps one MATLAB v5 file per frame, ``C/CCC/fixation/maps/NNNN.mat``, whose variable
``I`` is the frame's binary fixation map (non-zero at every fixated pixel; the authors' loader
reads it with ``scipy.io.loadmat(path)["I"]``). :func:`load_fixation_map` gives its points,
:func:`write_fixation_map` writes one.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import write_atomic
from pipeline.datasets.matcheck import check_v5

MatFormat = Literal["v5", "v7.3"]
MAT_FORMATS: tuple[MatFormat, ...] = ("v5", "v7.3")

VARIABLE = "fixdata"
_MAT_ERRORS = (MatReadError, ValueError, TypeError, IndexError, KeyError, OSError, EOFError,
               zlib.error)
"""What SciPy's MAT reader raises on damaged files (a header cut short raises IndexError)."""
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HEADER_LEN = 128
_USERBLOCK = 512
_NUMERIC_CLASSES = frozenset(
    {b"double", b"single", b"int8", b"uint8", b"int16", b"uint16", b"int32", b"uint32",
     b"int64", b"uint64", b"logical"}
)


def load_fixdata(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Load the ``fixdata`` cell array of one video.

    Args:
        path: a MATLAB v5 or v7.3 ``.mat`` file with a ``fixdata`` cell array.

    Returns:
        One ``float64 [N, k]`` array per cell, in MATLAB's linear (column-major) cell
        order, i.e. cell ``i`` (0-based) holds frame ``i + 1``. Empty cells come back
        as ``float64 [0, 0]``.

    Raises:
        BadInputError: the file is missing, truncated or corrupt, is not a MATLAB
            v5/v7.3 file, has no ``fixdata`` variable, or ``fixdata`` is not a cell
            array of numeric matrices.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_USERBLOCK + len(_HDF5_SIGNATURE))
    except FileNotFoundError:
        raise BadInputError(path, "missing fixdata file") from None
    except OSError as err:
        raise BadInputError(path, f"cannot read file ({err.strerror})") from None
    if head[:len(_HDF5_SIGNATURE)] == _HDF5_SIGNATURE or head[_USERBLOCK:] == _HDF5_SIGNATURE:
        return _load_v73(path)
    if len(head) < _HEADER_LEN:
        raise BadInputError(path, f"truncated: {len(head)} bytes is shorter than a MATLAB header")
    if not head.startswith(b"MATLAB"):
        raise BadInputError(path, "not a MATLAB .mat file (no 'MATLAB' header text)")
    version = head[124:126]
    if version in (b"\x00\x02", b"\x02\x00"):
        raise BadInputError(path, "truncated MATLAB v7.3 file (no HDF5 data after the header)")
    if version not in (b"\x00\x01", b"\x01\x00"):
        raise BadInputError(path, "unsupported MATLAB file version (only v5/v7 and v7.3 are read)")
    return _load_v5(path)


def _read_v5(path: Path, variable: str) -> dict[str, object]:
    """``scipy.io.loadmat`` of ``variable``, given only a file whose structure
    :func:`~pipeline.datasets.matcheck.check_v5` found sound (SciPy can crash the process on a
    damaged one); BadInputError for a damaged file (FileNotFoundError passes through)."""
    with open(path, "rb") as f:
        data = f.read()
    check_v5(data, str(path))
    try:
        return scipy.io.loadmat(io.BytesIO(data), variable_names=[variable])
    except _MAT_ERRORS as err:
        raise BadInputError(path, f"corrupt or truncated MATLAB v5 file ({err})") from None


def _load_v5(path: Path) -> list[np.ndarray]:
    try:
        contents = _read_v5(path, VARIABLE)
    except OSError as err:
        raise BadInputError(path, f"cannot read file ({err.strerror})") from None
    if VARIABLE not in contents:
        raise BadInputError(path, f"no '{VARIABLE}' variable")
    cells = contents[VARIABLE]
    if cells.dtype != object:
        raise BadInputError(path, f"'{VARIABLE}' is a {cells.dtype} matrix, not a cell array")
    return [_as_matrix(path, i, cell) for i, cell in enumerate(cells.ravel(order="F"))]


def _load_v73(path: Path) -> list[np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            var = f.get(VARIABLE)
            if var is None:
                raise BadInputError(path, f"no '{VARIABLE}' variable")
            if not isinstance(var, h5py.Dataset) or var.attrs.get("MATLAB_class") != b"cell":
                raise BadInputError(path, f"'{VARIABLE}' is not a cell array")
            # Stored transposed, so C order over the HDF5 shape is MATLAB's column-major order.
            refs = var[()].ravel()
            return [_read_v73_cell(path, f, i, ref) for i, ref in enumerate(refs)]
    except BadInputError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError,
            AttributeError) as err:     # h5py's errors for damaged structures vary by the damage
        detail = str(err).replace(str(path), "the file") or type(err).__name__
        raise BadInputError(path, f"corrupt or truncated MATLAB v7.3 (HDF5) file ({detail})"
                            ) from None


def _read_v73_cell(path: Path, f: h5py.File, index: int, ref: h5py.Reference) -> np.ndarray:
    if not ref:
        raise BadInputError(path, f"cell {index + 1} is a null reference")
    node = f[ref]
    if not isinstance(node, h5py.Dataset):
        raise BadInputError(path, f"cell {index + 1} is not a matrix")
    if node.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    cls = node.attrs.get("MATLAB_class")
    if cls not in _NUMERIC_CLASSES:
        raise BadInputError(
            path, f"cell {index + 1} has MATLAB class {cls!r}, not a numeric matrix")
    return _as_matrix(path, index, np.asarray(node[()]).T)


def _as_matrix(path: Path, index: int, cell: object) -> np.ndarray:
    arr = np.asarray(cell)
    if arr.size == 0:
        return np.zeros((0, 0))
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise BadInputError(
            path,
            f"cell {index + 1} is a {arr.dtype} array of shape {arr.shape}, not a numeric matrix",
        )
    return arr.astype(np.float64, copy=False)


def write_fixdata(
    path: str | os.PathLike[str], cells: Sequence[np.ndarray], mat_format: MatFormat = "v5"
) -> None:
    """Write a ``fixdata`` cell array as MATLAB would, atomically.

    Args:
        path: destination ``.mat`` file; written under a temporary name, fsynced, renamed.
        cells: one ``[N, k]`` numeric matrix per frame (``N`` may be 0); stored as double.
        mat_format: ``"v5"`` (zlib-compressed, MATLAB's default ``-v7``) or ``"v7.3"`` (HDF5).

    The bytes depend only on ``cells`` and ``mat_format`` (the header carries a fixed
    text instead of a creation date).
    """
    if mat_format not in MAT_FORMATS:
        raise ValueError(f"mat_format must be one of {MAT_FORMATS}, got {mat_format!r}")
    path = Path(path)
    if mat_format == "v5":
        write_atomic(path, _v5_bytes(cells))
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_v73(tmp, cells)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_char_rows(path: str | os.PathLike[str], variable: str, rows: Sequence[str]) -> None:
    """Write a MATLAB v5 file holding one char matrix, one row per string, atomically.

    This is the form of the released ``test.mat`` lists (variable ``test``, rows such as
    ``"04/000006.jpg"``) that the official MATLAB evaluation reads. Rows are space-padded
    to equal length, as MATLAB's ``char`` does. Deterministic bytes.
    """
    path = Path(path)
    width = max((len(row) for row in rows), default=0)
    chars = np.array([row.ljust(width) for row in rows], dtype=f"U{max(width, 1)}")
    buf = io.BytesIO()
    scipy.io.savemat(buf, {variable: chars}, do_compression=True)
    data = bytearray(buf.getvalue())
    data[:116] = _header_text("5.0")
    write_atomic(path, bytes(data))


FIXATION_MAP_VARIABLE = "I"


def load_fixation_map(path: str | os.PathLike[str], size: tuple[int, int]) -> np.ndarray:
    """The fixated pixels of a DADA-2000 fixation map: float64 ``[N, 2]`` (row, col), 1-based
    (as ``fixdata`` points are), in row-major order.

    Raises:
        BadInputError: the file is missing, not a MATLAB v5 file, or its ``I`` is absent, not
            a numeric ``size`` (height, width) matrix, or not finite.
    """
    path = Path(path)
    try:
        contents = _read_v5(path, FIXATION_MAP_VARIABLE)
    except FileNotFoundError:
        raise BadInputError(path, "missing fixation map") from None
    except OSError as err:
        raise BadInputError(path, f"cannot read file ({err.strerror})") from None
    matrix = contents.get(FIXATION_MAP_VARIABLE)
    if matrix is None:
        raise BadInputError(path, f"no '{FIXATION_MAP_VARIABLE}' variable")
    if matrix.dtype == object or matrix.dtype.kind not in "biuf" or matrix.ndim != 2:
        raise BadInputError(path, f"'{FIXATION_MAP_VARIABLE}' is a {matrix.dtype}"
                            f" {matrix.shape} array, not a numeric map")
    if matrix.shape != tuple(size):
        raise BadInputError(path, f"'{FIXATION_MAP_VARIABLE}' is {matrix.shape[1]}x"
                            f"{matrix.shape[0]}, not the frame's {size[1]}x{size[0]}")
    if matrix.dtype.kind == "f" and not np.isfinite(matrix).all():
        raise BadInputError(path, f"'{FIXATION_MAP_VARIABLE}' has NaN/inf values")
    return np.argwhere(matrix != 0).astype(np.float64) + 1


def write_fixation_map(path: str | os.PathLike[str], fixated: np.ndarray) -> None:
    """Write a DADA-2000-style fixation map (``I``: uint8, 1 where ``fixated``), atomically and
    byte-for-byte deterministic."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, {FIXATION_MAP_VARIABLE: (np.asarray(fixated) != 0).astype(np.uint8)},
                     do_compression=True)
    data = bytearray(buf.getvalue())
    data[:116] = _header_text("5.0")
    write_atomic(Path(path), bytes(data))


def _header_text(version: str) -> bytes:
    text = f"MATLAB {version} MAT-file, written by salmm (deterministic header)"
    if version == "7.3":
        text += " HDF5 schema 1.00 ."
    return text.encode("ascii").ljust(116)


def _v5_bytes(cells: Sequence[np.ndarray]) -> bytes:
    cell_array = np.empty((len(cells), 1), dtype=object)
    for i, cell in enumerate(cells):
        cell_array[i, 0] = np.atleast_2d(np.asarray(cell, dtype=np.float64))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {VARIABLE: cell_array}, do_compression=True)
    data = bytearray(buf.getvalue())
    data[:116] = _header_text("5.0")  # scipy stamps the current time here
    return bytes(data)


def _write_v73(path: Path, cells: Sequence[np.ndarray]) -> None:
    with h5py.File(path, "w", userblock_size=_USERBLOCK, track_order=False) as f:
        refs = f.create_group("#refs#")
        var = f.create_dataset(VARIABLE, shape=(1, len(cells)), dtype=h5py.ref_dtype)
        var.attrs["MATLAB_class"] = np.bytes_("cell")
        for i, cell in enumerate(cells):
            cell = np.asarray(cell, dtype=np.float64)
            name = f"c{i}"
            if cell.size == 0:
                dims = np.array(np.atleast_2d(cell).shape, dtype=np.uint64)
                node = refs.create_dataset(name, data=dims)
                node.attrs["MATLAB_empty"] = np.uint8(1)
            else:
                node = refs.create_dataset(name, data=np.ascontiguousarray(cell.T))
            node.attrs["MATLAB_class"] = np.bytes_("double")
            var[0, i] = node.ref
    with open(path, "r+b") as f:
        f.write(_header_text("7.3") + b"\x00" * 8 + b"\x00\x02" + b"IM")
        f.flush()
        os.fsync(f.fileno())
