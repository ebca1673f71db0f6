"""salmm.evaluation.matlab_export: the pre/ tar/ test.mat layout the official MATLAB scripts read."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from pipeline.core.errors import BadInputError
from salmm.evaluation import matlab_export as X

NAMES = ["04/000006.jpg", "04/000007.jpg", "13/001200.jpg"]


def _frames(names, dtype=np.float32):
    rng = np.random.default_rng(0)
    return [(n, rng.random((6, 10)).astype(dtype), rng.random((6, 10))) for n in names]


def test_round_trip_maps_and_names(tmp_path):
    frames = _frames(NAMES)
    assert X.export_for_matlab(tmp_path, frames) == NAMES
    assert X.read_name_list(tmp_path / "test.mat") == NAMES
    for name, pred, label in frames:
        got_pred, got_label = X.read_frame(tmp_path, name)
        assert got_pred.dtype == np.float32 and got_label.dtype == np.float64
        np.testing.assert_array_equal(got_pred, pred)
        np.testing.assert_array_equal(got_label, label)
    assert (tmp_path / "pre" / "04" / "000006.mat").is_file()
    assert (tmp_path / "tar" / "13" / "001200.mat").is_file()


def test_files_have_the_official_variables_and_shapes(tmp_path):
    X.export_for_matlab(tmp_path, _frames(["0006/0004.jpg", "0006/0005.jpg"]))
    names = scipy.io.loadmat(tmp_path / "test.mat", chars_as_strings=False)["test"]
    assert names.shape == (2, 13)  # char matrix, one 13-character row per frame
    assert "".join(names[1, :9]) == "0006/0005"  # what test(i, 1:9) gives MATLAB
    pre = scipy.io.loadmat(tmp_path / "pre" / "0006" / "0004.mat")
    assert set(pre) - {"__header__", "__version__", "__globals__"} == {"pre"}
    assert pre["pre"].shape == (6, 10)
    assert pre["__header__"].startswith(b"MATLAB 5.0 MAT-file")


def test_bytes_are_deterministic(tmp_path):
    X.export_for_matlab(tmp_path / "a", _frames(NAMES[:1]))
    X.export_for_matlab(tmp_path / "b", _frames(NAMES[:1]))
    for rel in ("test.mat", "pre/04/000006.mat", "tar/04/000006.mat"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_other_dtypes_are_stored_as_double(tmp_path):
    X.write_frame(tmp_path, NAMES[0], np.arange(60, dtype=np.uint8).reshape(6, 10), np.eye(6))
    pred, label = X.read_frame(tmp_path, NAMES[0])
    assert pred.dtype == np.float64 and pred[5, 9] == 59
    assert label.dtype == np.float64


@pytest.mark.parametrize(
    "name", ["4/000006.jpg", "04/000006.png", "04-000006.jpg", "04/00006.jpg", "ab/cdefgh.jpg", 7]
)
def test_names_the_scripts_cannot_slice_are_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="frame name"):
        X.write_name_list(tmp_path / "test.mat", [NAMES[0], name])
    assert not (tmp_path / "test.mat").exists()


def test_name_list_is_written_only_after_every_frame(tmp_path):
    frames = _frames(NAMES)
    frames[2] = (NAMES[2], np.full((6, 10), np.nan), frames[2][2])
    with pytest.raises(ValueError, match="13/001200.jpg.*NaN"):
        X.export_for_matlab(tmp_path, frames)
    assert not (tmp_path / "test.mat").exists()
    with pytest.raises(ValueError, match="twice"):
        X.export_for_matlab(tmp_path, _frames([NAMES[0], NAMES[0]]))
    assert not (tmp_path / "test.mat").exists()
    with pytest.raises(ValueError, match="empty"):
        X.export_for_matlab(tmp_path, [])


def test_bad_files_are_reported_with_their_path(tmp_path):
    junk = tmp_path / "test.mat"
    junk.write_bytes(b"not a mat file")
    with pytest.raises(BadInputError, match="test.mat: cannot read"):
        X.read_name_list(junk)
    scipy.io.savemat(junk, {"other": np.zeros(2)})
    with pytest.raises(BadInputError, match="no variable 'test'"):
        X.read_name_list(junk)
    with pytest.raises(BadInputError, match="000006.mat"):
        X.read_frame(tmp_path, NAMES[0])
