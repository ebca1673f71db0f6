"""Export predictions in the layout the authors' MATLAB evaluation reads, so scores can be
certified with MATLAB.

The official scripts (``calcForTrafficGaze.m``, ``calcForDrFixDrainy.m``, ``calcForBDDA.m``)
take an output folder and a name list and, for each row ``name`` of the list, load::

    <root>/pre/<name[:9]>.mat   variable ``pre``: the prediction [H, W]
    <root>/tar/<name[:9]>.mat   variable ``tar``: the ground-truth map [H, W]

The name list is a MATLAB v5 ``.mat`` file with one variable ``test``: a char matrix with
one 13-character row per frame, ``"VV/FFFFFF.jpg"`` (TrafficGaze, DrFixD-rainy) or
``"VVVV/FFFF.jpg"`` (BDDA); the scripts use characters 1-9 as the file stem (and, for the two
fixation datasets, characters 1-2 as the video and 4-9 as the frame number).

Maps are written as MATLAB v5 files like the authors' ``saveMat.py`` (``scipy.io.savemat``);
a float32 map stays float32 (what the model emits), anything else is stored as float64. Each
file is written atomically, and the name list last, so a folder with a name list is complete.
The 116-byte text header carries a fixed text instead of a creation time, so the bytes
depend only on the data.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.io

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import write_atomic
from pipeline.core.progress import track

log = logging.getLogger(__name__)

PRED_DIR, PRED_VAR = "pre", "pre"
LABEL_DIR, LABEL_VAR = "tar", "tar"
NAMES_VAR = "test"
NAMES_FILE = "test.mat"

_NAME = re.compile(r"^(\d{2}/\d{6}|\d{4}/\d{4})\.jpg$")
_HEADER = b"MATLAB 5.0 MAT-file, written by salmm.evaluation.matlab_export".ljust(116)


def check_frame_name(name: str) -> str:
    """``name`` if it has the form the MATLAB scripts slice; ValueError otherwise.

    Accepted: ``"VV/FFFFFF.jpg"`` (TrafficGaze, DrFixD-rainy) and ``"VVVV/FFFF.jpg"`` (BDDA),
    digits only; both are 13 characters with a 9-character stem.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"frame name {name!r}: expected 'VV/FFFFFF.jpg' or 'VVVV/FFFF.jpg' (the official "
            "MATLAB scripts read characters 1-9 as the file stem)"
        )
    return name


def _mat_bytes(variables: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables)
    data = bytearray(buf.getvalue())
    data[:116] = _HEADER  # scipy stamps the current time here
    return bytes(data)


def _as_stored_map(what: str, name: str, m: np.ndarray) -> np.ndarray:
    arr = np.asarray(m)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{what} for {name}: expected a non-empty 2-D map, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{what} for {name}: expected real numbers, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} for {name}: map contains NaN or inf")
    return np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype == np.float32 else np.float64)


def map_paths(name: str) -> tuple[str, str]:
    """Relative paths ``(pre/<stem>.mat, tar/<stem>.mat)`` of one frame's two files."""
    stem = check_frame_name(name)[:9]
    return f"{PRED_DIR}/{stem}.mat", f"{LABEL_DIR}/{stem}.mat"


def write_frame(
    root: str | os.PathLike[str], name: str, pred: np.ndarray, label: np.ndarray
) -> None:
    """Write one frame's prediction and label [H, W] under ``root`` (see the module doc)."""
    pred_path, label_path = map_paths(name)
    pred_bytes = _mat_bytes({PRED_VAR: _as_stored_map("prediction", name, pred)})
    label_bytes = _mat_bytes({LABEL_VAR: _as_stored_map("label", name, label)})
    write_atomic(Path(root) / pred_path, pred_bytes)
    write_atomic(Path(root) / label_path, label_bytes)


def write_name_list(path: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Write the ``test`` char matrix [N, 13] of frame names as a MATLAB v5 file, atomically."""
    rows = [check_frame_name(n) for n in names]
    if not rows:
        raise ValueError(f"{path}: refusing to write an empty name list")
    write_atomic(Path(path), _mat_bytes({NAMES_VAR: np.array(rows)}))


def export_for_matlab(
    root: str | os.PathLike[str],
    frames: Iterable[tuple[str, np.ndarray, np.ndarray]],
    names_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Write ``(name, pred [H, W], label [H, W])`` frames, then the name list; the names.

    The name list goes to ``names_path`` (default ``<root>/test.mat``) only after every frame
    is on disk, in the order the frames came. A repeated name is an error (its files would be
    overwritten and scored twice).
    """
    names: list[str] = []
    seen: set[str] = set()
    for name, pred, label in track(frames, desc="export .mat", unit="frame", leave=False):
        if name in seen:
            raise ValueError(f"frame name {name!r} appears twice")
        write_frame(root, name, pred, label)
        names.append(name)
        seen.add(name)
    target = Path(names_path) if names_path is not None else Path(root) / NAMES_FILE
    write_name_list(target, names)
    log.info("exported %d frames for MATLAB to %s (name list %s)", len(names), root, target)
    return names


def _load_variable(path: Path, variable: str) -> np.ndarray:
    try:
        contents = scipy.io.loadmat(path)
    except (OSError, ValueError, scipy.io.matlab.MatReadError) as err:
        raise BadInputError(path, f"cannot read as a MATLAB .mat file ({err})") from err
    if variable not in contents:
        raise BadInputError(path, f"no variable {variable!r} (has {sorted(contents)})")
    return contents[variable]


def read_frame(root: str | os.PathLike[str], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read back ``(pred, label)`` of one frame written by :func:`write_frame`."""
    pred_path, label_path = map_paths(name)
    return (
        _load_variable(Path(root) / pred_path, PRED_VAR),
        _load_variable(Path(root) / label_path, LABEL_VAR),
    )


def read_name_list(path: str | os.PathLike[str]) -> list[str]:
    """Frame names from a ``test.mat`` name list (ours or the official ones)."""
    names = _load_variable(Path(path), NAMES_VAR)
    if names.dtype.kind != "U":
        raise BadInputError(path, f"variable {NAMES_VAR!r} is not a char matrix")
    return [str(n) for n in np.atleast_1d(names)]
