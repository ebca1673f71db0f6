"""The structural check that stands between damaged ``.mat`` files and SciPy's reader, which can
crash the whole process on them (a segmentation fault no ``except`` catches)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipeline.core.errors import BadInputError
from pipeline.datasets.matcheck import check_v5
from pipeline.datasets.matfile import _v5_bytes, load_fixation_map, load_fixdata


def _saved(variables: dict, compress: bool) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=compress)
    return buf.getvalue()


def _originals() -> list[bytes]:
    rng = np.random.default_rng(5)
    cells = np.array([[rng.random((6, 4))], [np.zeros((0, 0))], [rng.random((3, 4))]],
                     dtype=object)
    fixated = (rng.random((30, 40)) > 0.9).astype(np.uint8)
    return [_saved({"fixdata": cells}, compress) for compress in (False, True)] + \
        [_saved({"I": fixated}, compress) for compress in (False, True)]


@pytest.mark.parametrize("compress", [False, True])
def test_sound_files_of_every_kind_pass(compress):
    rng = np.random.default_rng(0)
    for variables in ({"fixdata": np.array([[np.ones((3, 4))]], dtype=object)},
                      {"I": np.eye(5, dtype=np.uint8)}, {"z": np.array([[1 + 2j, 3]])},
                      {"text": "a char row"}, {"flags": np.array([[True, False]])},
                      {"empty": np.zeros((0, 3))}, {"big": rng.random((200, 300))},
                      {"a": np.int16([[1, -2]]), "b": np.uint64([[7]]), "c": np.float32([[1]])}):
        check_v5(_saved(variables, compress), "ok.mat")
    check_v5(_v5_bytes([rng.random((40, 4)), np.zeros((0, 0))]), "fixdata.mat")


def test_what_scipy_would_crash_on_is_refused_and_what_passes_loads(tmp_path: Path):
    rng = np.random.default_rng(7)
    originals = _originals()
    passed, refused = [], 0
    for k in range(600):
        data = np.frombuffer(originals[k % len(originals)], np.uint8).copy()
        flips = rng.random(len(data)) < (0.002, 0.01, 0.03)[k % 3]
        data[flips] ^= rng.integers(1, 256, int(flips.sum()), dtype=np.uint8)
        try:
            check_v5(data.tobytes(), f"fuzz{k}.mat")
        except BadInputError as err:
            assert str(err).startswith(f"fuzz{k}.mat: corrupt or truncated MATLAB v5 file (")
            assert "\n" not in str(err)
            refused += 1
            continue
        path = tmp_path / f"{len(passed)}.mat"
        path.write_bytes(data.tobytes())
        passed.append(path)
    assert refused > 200 and len(passed) > 100
    # every file the check lets through, read by SciPy in a process of its own: it survives
    reader = ("import sys, scipy.io\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n        scipy.io.loadmat(path)\n    except Exception:\n        pass\n"
              "print('survived')")
    child = subprocess.run([sys.executable, "-c", reader, *map(str, passed)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0 and child.stdout.strip() == "survived", child.stderr[-500:]


def test_the_readers_refuse_a_damaged_file_in_one_line(tmp_path: Path):
    data = bytearray(_originals()[0])
    data[136:140] = (65289).to_bytes(4, "little")      # a data type the format has not
    (tmp_path / "fixdata1.mat").write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=r"fixdata1\.mat: corrupt or truncated MATLAB v5"
                                            r" file \(unknown data type 65289 at byte 136\)"):
        load_fixdata(tmp_path / "fixdata1.mat")
    fixated = bytearray(_originals()[2])
    fixated[132:136] = (2 ** 31).to_bytes(4, "little")  # the matrix claims 2 GB
    (tmp_path / "0001.mat").write_bytes(bytes(fixated))
    with pytest.raises(BadInputError, match="claims 2147483648 bytes, more than there are"):
        load_fixation_map(tmp_path / "0001.mat", (30, 40))
