"""salmm download from a stand-in Hugging Face Hub on 127.0.0.1: a mirror holding a zip of a
synthetic TrafficGaze root comes out in the readers' layout with its commit recorded; a hostile
archive, a dataset without a mirror and an unreachable Hub are one line each."""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from pathlib import Path

import pytest

from pipeline import download as download_command
from tests._fake_hub import FakeHub, Served

REPO = ("datasets", "springyu/TrafficGaze")


def _zipped(root: Path, top: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zipped:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zipped.write(path, f"{top}/{path.relative_to(root).as_posix()}")
    return buf.getvalue()


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_mirror_comes_out_in_the_readers_layout(synth_dataset, tmp_path, monkeypatch,
                                                  caplog):
    raw = synth_dataset("trafficgaze", videos=3, frames=8)
    fake = FakeHub(repos={REPO: {"main": {"TrafficGaze.zip": _zipped(raw, "TrafficGaze"),
                                          "README.md": b"# mirror"}}})
    with Served(fake) as served, caplog.at_level(logging.INFO):
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        assert download_command.main(["trafficgaze", "--out", str(tmp_path)]) == 0
        assert download_command.main(["trafficgaze", "--out", str(tmp_path)]) == 0   # kept
    root = tmp_path / "TrafficGaze"
    record = json.loads((root / "DOWNLOAD.json").read_text())
    assert record["commit"] == fake.commit(*REPO, "main") and record["revision"] == "main"
    assert set(record["files"]) == {"TrafficGaze.zip", "README.md"}
    for path in raw.rglob("*"):
        if path.is_file():
            assert (root / path.relative_to(raw)).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TrafficGaze"]   # nothing left over
    messages = [r.getMessage() for r in caplog.records]
    assert "complete: ready to normalize" in messages
    assert any("is already there" in m for m in messages)


def test_an_archive_member_outside_the_folder_is_refused(tmp_path, monkeypatch, caplog):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zipped:
        zipped.writestr("../escaped.txt", b"x")
    fake = FakeHub(repos={REPO: {"main": {"TrafficGaze.zip": buf.getvalue()}}})
    with Served(fake) as served, caplog.at_level(logging.INFO):
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        assert download_command.main(["trafficgaze", "--out", str(tmp_path / "out")]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "TrafficGaze.zip: cannot be unpacked safely" in errors[0]
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", None])
def test_no_mirror_or_no_network_is_one_line(endpoint, tmp_path, monkeypatch, caplog):
    dataset = "drfixd-rainy" if endpoint else "bdda"
    if endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        assert download_command.main([dataset, "--out", str(tmp_path)]) == 2
    assert time.monotonic() - start < 10
    errors = _errors(caplog)
    assert len(errors) == 1
    if endpoint:
        assert "springyu/DrFixD_rainy: the Hub cannot be reached" in errors[0]
    else:
        assert errors[0].startswith("BDDA: no mirror to download from: BDDA has no Hugging")
        assert "check-layout" in errors[0]
