"""salmm official fetch against a stand-in release host on 127.0.0.1: a cut download resumes
with a range request, a sha256 that does not match is refused in one line and nothing is kept,
no network is one line in seconds saying what to do."""

from __future__ import annotations

import hashlib
import logging
import time

import torch

from salmm import official as official_command
from salmm.model.net import SalMM
from salmm.model.official import RELEASES, save_official
from tests._fake_hub import FakeHub, Served

FILE = RELEASES["bdda"].file


def _release(tmp_path) -> bytes:
    torch.manual_seed(0)
    save_official(tmp_path / "made.tar", SalMM(backend="builtin"), epoch=7, valid_loss=0.5)
    return (tmp_path / "made.tar").read_bytes()


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_cut_download_resumes_and_is_checked(tmp_path, monkeypatch, caplog):
    data = _release(tmp_path)
    fake = FakeHub(files={FILE: data}, cut_once={FILE})
    with Served(fake) as served, caplog.at_level(logging.INFO):
        monkeypatch.setenv("SALMM_RELEASES_URL", f"{served.url}/files")
        assert official_command.main(["fetch", "bdda", "--out", str(tmp_path / "got"),
                                      "--sha256", hashlib.sha256(data).hexdigest()]) == 0
    assert (tmp_path / "got" / FILE).read_bytes() == data
    assert not (tmp_path / "got" / f"{FILE}.part").exists()
    ranges = [r[2] for r in fake.requests if r[0] == "GET" and r[2]]
    assert ranges == [f"bytes={len(data) // 2}-"]
    assert any("epoch 7, every SalMM key present" in r.getMessage() for r in caplog.records)


def test_a_sha256_mismatch_keeps_nothing(tmp_path, monkeypatch, caplog):
    data = _release(tmp_path)
    with Served(FakeHub(files={FILE: data})) as served, caplog.at_level(logging.INFO):
        monkeypatch.setenv("SALMM_RELEASES_URL", f"{served.url}/files")
        assert official_command.main(["fetch", "bdda", "--out", str(tmp_path / "got"),
                                      "--sha256", "0" * 64]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "is not the pinned 0000000000000000" in errors[0]
    assert list((tmp_path / "got").iterdir()) == []


def test_unpinned_release_is_checked_key_by_key_and_said_so(tmp_path, monkeypatch, caplog):
    data = _release(tmp_path)
    with Served(FakeHub(files={FILE: data})) as served, caplog.at_level(logging.INFO):
        monkeypatch.setenv("SALMM_RELEASES_URL", f"{served.url}/files")
        assert official_command.main(["fetch", "bdda", "--out", str(tmp_path / "got")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no pinned sha256" in w and hashlib.sha256(data).hexdigest() in w
               for w in warnings)


def test_no_network_is_one_line_in_seconds(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SALMM_RELEASES_URL", "http://127.0.0.1:9/files")
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        assert official_command.main(["fetch", "trafficgaze", "--out", str(tmp_path)]) == 2
    assert time.monotonic() - start < 10
    errors = _errors(caplog)
    assert len(errors) == 1 and "download it on a machine with a network" in errors[0]
    assert f"salmm official {tmp_path / RELEASES['trafficgaze'].file} --check" in errors[0]
