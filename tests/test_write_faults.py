"""Every command, every kind of write, every way a write fails (a full disk, a quota, a read-only
file system, no permission): one line ``<path>: cannot be written (<reason>)``, exit status 1,
no traceback, and the output folder holds no half-written file presented as complete.

Failures are injected in this process at the operating-system calls the writes go through
(``open`` for writing, ``os.open``, ``os.replace``/``os.rename``, ``os.mkdir``) for paths under
the output (and, to reach each kind of write, only for names that match a pattern).
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import logging
import os
import shutil
from pathlib import Path

import pytest

from pipeline import cli as pipeline_cli
from salmm import compare, evaluate, export, predict, train
from tests._inference_data import InferenceData, inference_data, stand_in_graphs

ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES]
# a writer thread's traceback on stderr is a failure too
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def cases(*kinds: str) -> pytest.MarkDecorator:
    """(errno, file-name pattern) cases: every errno on the first kind of write ("*": the
    first write of any kind), then each other kind once, the errnos taking turns (they share
    one code path; the kinds of write do not)."""
    pairs = [(code, kinds[0]) for code in ERRNOS]
    pairs += [(ERRNOS[i % len(ERRNOS)], kind) for i, kind in enumerate(kinds[1:])]
    return pytest.mark.parametrize("code, pattern", pairs,
                                   ids=[f"{errno.errorcode[c]}-{k}" for c, k in pairs])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Faults:
    """Makes writes under ``root`` whose file name matches ``pattern`` fail with ``code``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int,
                 pattern: str = "*") -> None:
        self.root, self.code, self.pattern = str(Path(root).resolve()), code, pattern
        self.hits: list[str] = []
        real_open, real_os_open = builtins.open, os.open
        real_replace, real_rename, real_mkdir = os.replace, os.rename, os.mkdir

        def fail(path) -> None:
            text = os.fsdecode(path) if not isinstance(path, int) else ""
            full = os.path.abspath(text)
            if full.startswith(self.root) and fnmatch.fnmatch(os.path.basename(full), pattern):
                self.hits.append(full)
                raise OSError(code, os.strerror(code), text)

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                fail(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                fail(path)
            return real_os_open(path, flags, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            fail(dst)
            return real_replace(src, dst, *args, **kwargs)

        def rename(src, dst, *args, **kwargs):
            fail(dst)
            return real_rename(src, dst, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            fail(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "mkdir", mkdir)


def check_one_line(caplog: pytest.LogCaptureFixture, code: int, status: int, out: Path,
                   faults: Faults) -> None:
    assert faults.hits, "the fault was never reached: the test proves nothing"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 1, errors
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].endswith(f": cannot be written ({os.strerror(code)})"), errors[0]
    assert str(out) in errors[0] or os.path.basename(faults.hits[0]) in errors[0], errors[0]
    assert not any(r.exc_info for r in caplog.records)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


@pytest.fixture(scope="module")
def trainable(commands_prepared: Path) -> Path:
    return commands_prepared


# ---- python -m pipeline normalize | embed --------------------------------------------------------


@cases("*", "*.tar*", "manifest.json*", "*-index.npy*", "inputs.jsonl*")
def test_normalize(data, tmp_path, monkeypatch, caplog, code, pattern):
    out = tmp_path / "prepared"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = pipeline_cli.main(["normalize", "--dataset", "trafficgaze", "--root",
                                    str(data.raw), "--out", str(out), "--size", "64x64",
                                    "--shard-size", "3", "--workers", "1"])
    check_one_line(caplog, code, status, out, faults)
    assert not (out / "manifest.json").exists()


@cases("*", "c", "zarr.json*")
def test_embed(data, tmp_path, monkeypatch, caplog, code, pattern):
    prepared = tmp_path / "prepared"
    shutil.copytree(data.prepared, prepared, ignore=shutil.ignore_patterns("clip"))
    out = tmp_path / "cache.zarr"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = pipeline_cli.main(["embed", "--prepared", str(prepared), "--clip-pretrained",
                                    "none", "--split", "test", "--workers", "1", "--out",
                                    str(out)])
    check_one_line(caplog, code, status, out, faults)


# ---- the salmm commands ------------------------------------------------------------------------


@cases("*", "last.pt*", "metrics.csv*", "curves.png*", "events.out*", "train.log",
       "config.json*")
def test_train(trainable, tmp_path, monkeypatch, caplog, code, pattern):
    out = tmp_path / "run"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = train.main(["--cached-clip", "--prepared", str(trainable), "--clip-pretrained",
                             "none", "--size", "64x64", "--batch-size", "4", "--epochs", "1",
                             "--workers", "0", "--out", str(out)])
    check_one_line(caplog, code, status, out, faults)


@cases("*", "per_frame.csv*", "summary.json*", "*.mat*")
def test_evaluate(data, tmp_path, monkeypatch, caplog, code, pattern):
    out = tmp_path / "eval"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = evaluate.main(["--checkpoint", str(data.trainer), "--prepared",
                                str(data.prepared), "--out", str(out), "--cached-clip",
                                "--workers", "0", "--export-mat", str(out / "mat")])
    check_one_line(caplog, code, status, out, faults)
    assert not (out / "summary.json").exists()


@cases("*", "comparison.*")
def test_compare(data, tmp_path, monkeypatch, caplog, code, pattern):
    out = tmp_path / "compare"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = compare.main(["--baseline", "uniform", "--prepared", str(data.prepared),
                               "--out", str(out), "--workers", "0"])
    check_one_line(caplog, code, status, out, faults)


@cases("*", "*.png*", "*.mp4")
def test_predict(data, tmp_path, monkeypatch, caplog, code, pattern):
    out = tmp_path / "pictures"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = predict.main(["--checkpoint", str(data.trainer), "--input", str(data.prepared),
                               "--out", str(out), "--limit", "2", "--clip-pretrained", "none"])
    check_one_line(caplog, code, status, out, faults)


@pytest.mark.parametrize("code, pattern", [(errno.ENOSPC, "*"), (errno.EDQUOT, "*.onnx*"),
                                           (errno.EROFS, "export.json*"),
                                           (errno.EACCES, "*")],
                         ids=["ENOSPC-folder", "EDQUOT-graph", "EROFS-record", "EACCES-folder"])
def test_export(data, tmp_path, monkeypatch, caplog, code, pattern):
    stand_in_graphs(monkeypatch)  # the writes are the point, not tracing the graphs
    out = tmp_path / "deploy"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = export.main(["--checkpoint", str(data.trainer), "--out", str(out)])
    check_one_line(caplog, code, status, out, faults)
    assert not (out / "export.json").exists()


@cases("*", "overlay.mp4", "overlay.mp4.json*")
def test_stream(data, tmp_path, monkeypatch, caplog, code, pattern):
    import cv2

    from salmm import stream

    source = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 5, (96, 64))
    for name in sorted((data.raw / "trafficframe" / "03").glob("*.jpg"))[:3]:
        writer.write(cv2.resize(cv2.imread(str(name)), (96, 64)))
    writer.release()
    out = tmp_path / "out"
    faults = Faults(monkeypatch, out, code, pattern)
    with caplog.at_level(logging.INFO):
        status = stream.main(["--checkpoint", str(data.trainer), "--input", str(source),
                              "--out", str(out / "overlay.mp4"), "--clip-pretrained", "none"])
    check_one_line(caplog, code, status, out, faults)
    assert not (out / "overlay.mp4").exists() or pattern == "overlay.mp4.json*"


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
def test_synth(tmp_path, monkeypatch, caplog, code):
    out = tmp_path / "raw"
    faults = Faults(monkeypatch, tmp_path, code, "*.jpg*")   # it builds beside --out, then renames
    with caplog.at_level(logging.INFO):
        status = pipeline_cli.main(["synth", "--dataset", "bdda", "--out", str(out),
                                    "--videos", "3", "--frames", "5"])
    check_one_line(caplog, code, status, out, faults)
