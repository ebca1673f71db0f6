"""Hostile paths and tampered files: names that try to leave their folder, shard members that are
links or paths, two writers on one output, and the leftovers of killed runs."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats.manifest import read_manifest, write_manifest
from pipeline.verify import verify
from salmm import compare, evaluate, train
from salmm.evaluation import evaluator
from salmm.evaluation.options import EvalOptions
from salmm.render.overlay import VideoWriter, write_animation
from tests._inference_data import InferenceData, inference_data
from tests._prepared import write_prepared


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


def _rewrite(prepared: Path, edit) -> None:
    """Edit the manifest and store it with a matching version id (what a careful forger does)."""
    manifest = read_manifest(str(prepared))
    edit(manifest)
    write_manifest(Folder(prepared), {k: v for k, v in manifest.items() if k != "version_id"})


@pytest.mark.parametrize("name", ["../outside/train-000000.tar", "/etc/train-000000.tar",
                                  "train-000000.tar/../../x.tar", "valid-000000.tar",
                                  "train-1.tar"])
def test_a_manifest_cannot_name_a_shard_outside_its_folder(tmp_path, name):
    prepared = write_prepared(tmp_path / "p", {"train": [2], "valid": [1]})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "train-000000.tar").write_bytes((prepared / "train-000000.tar").read_bytes())

    def edit(manifest):
        manifest["splits"]["train"]["shards"][0]["name"] = name
    _rewrite(prepared, edit)
    with pytest.raises(BadInputError, match="malformed manifest: splits.train.shards") as err:
        read_manifest(str(prepared))
    assert "\n" not in str(err.value) and "sha256" not in str(err.value)
    problems = verify(str(prepared))
    assert len(problems) == 1 and "not train-NNNNNN.tar in the prepared folder" in problems[0]


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
            ) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("member, problem", [
    (_member("../x.json", b"{}"), "is not named <key>.<field>"),
    (_member("/etc/passwd.json", b"{}"), "is not named <key>.<field>"),
    (_member("v0001_f000001/x.json", b"{}"), "is not named <key>.<field>"),
    (_member("v0001_f000001.json", kind=tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
    (_member("v0001_f000001.json", kind=tarfile.LNKTYPE, link="v0000_f000001.json"),
     "is a link"),
], ids=["dotdot", "absolute", "folder", "symlink", "hardlink"])
def test_verify_refuses_shard_members_that_are_paths_or_links(data, tmp_path, member,
                                                             problem):
    prepared = tmp_path / "p"
    shutil.copytree(data.prepared, prepared, ignore=shutil.ignore_patterns("clip"))
    shard = prepared / "test-000000.tar"
    with tarfile.open(shard, "a", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(*member)

    def edit(manifest):
        manifest["splits"]["test"]["shards"][0]["sha256"] = hashlib.sha256(
            shard.read_bytes()).hexdigest()
    _rewrite(prepared, edit)
    problems = verify(str(prepared))
    assert any(problem in p and "test-000000.tar" in p for p in problems), problems
    assert all("\n" not in p for p in problems)


# ---- one writer per output folder --------------------------------------------------------------


def _refused(caplog, status: int) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 1 and len(errors) == 1, errors
    assert "another run is writing here (pid" in errors[0]
    return errors[0]


def test_a_second_trainer_on_one_folder_is_refused_in_one_line(tmp_path, caplog,
                                                               commands_prepared):
    prepared = commands_prepared
    out = tmp_path / "run"
    with Folder(out).lock(), caplog.at_level(logging.INFO):
        status = train.main(["--cached-clip", "--prepared", str(prepared), "--clip-pretrained",
                             "none", "--size", "64x64", "--epochs", "1", "--workers", "0",
                             "--out", str(out)])
    _refused(caplog, status)
    assert not (out / "last.pt").exists() and not (out / "config.json").exists()


def test_a_second_evaluation_or_comparison_on_one_folder_is_refused(data, tmp_path, caplog):
    out = tmp_path / "eval"
    with Folder(out).lock(), caplog.at_level(logging.INFO):
        status = evaluate.main(["--baseline", "uniform", "--prepared", str(data.prepared),
                                "--out", str(out), "--workers", "0"])
    _refused(caplog, status)
    caplog.clear()
    with Folder(tmp_path / "cmp").lock(), caplog.at_level(logging.INFO):
        status = compare.main(["--baseline", "uniform", "--prepared", str(data.prepared),
                               "--out", str(tmp_path / "cmp"), "--workers", "0"])
    _refused(caplog, status)


# ---- leftovers of killed runs ------------------------------------------------------------------


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_the_next_run_removes_what_a_killed_one_left(data, tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    video = tmp_path / "v" / "overlay.mp4"
    video.parent.mkdir()
    stale = video.with_name(f".overlay.tmp-{dead}.mp4")
    busy = video.with_name(f".overlay.tmp-{alive}.mp4")          # another live writer's
    stale.write_bytes(b"half a video")
    busy.write_bytes(b"being written")
    frame = np.zeros((32, 32, 3), np.uint8)
    with VideoWriter(video, fps=5) as writer:
        writer.write(frame)
    assert video.is_file() and not stale.exists() and busy.exists()
    gif = tmp_path / "g" / "animation.gif"
    gif.parent.mkdir()
    left = gif.with_name(f".animation.tmp-{dead}.gif")
    left.write_bytes(b"half")
    write_animation(gif, [frame, frame], fps=2)
    assert gif.is_file() and not left.exists()

    out = tmp_path / "eval"
    out.mkdir()
    (out / "per_video.csv.tmp-0123456789ab").write_bytes(b"half a table")
    evaluator.evaluate(EvalOptions(checkpoint=None, baseline="uniform",
                                           prepared=str(data.prepared), out=str(out),
                                           workers=0))
    assert not list(out.glob("*.tmp-*")) and (out / "summary.json").is_file()
