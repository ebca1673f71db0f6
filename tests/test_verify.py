"""verify: re-hash a prepared dataset and say exactly what differs."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_dataset
from distributed import LocalCluster

from pipeline.formats.manifest import INPUTS, MANIFEST
from pipeline.normalize import normalize
from pipeline.verify import verify

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("verify")
    cells = [np.array([[0, 0, 640.0, 360.0]])] * 5
    root = write_tiny_dataset(base / "raw", "drfixd-rainy", {3: cells, 4: cells},
                              splits={"train": [3], "test": [4]})
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"},
                      silence_logs=logging.ERROR) as cluster:
        normalize("drfixd-rainy", root, str(base / "out"), shard_size=2,
                  dask_address=cluster.scheduler_address, progress=False)
    return base / "out"


@pytest.fixture
def prepared(prepared_once, tmp_path) -> Path:
    return Path(shutil.copytree(prepared_once, tmp_path / "out"))


def test_intact_dataset_verifies(prepared):
    assert verify(str(prepared)) == []


def test_flipped_byte_in_a_shard(prepared):
    shard = prepared / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first member's content
    shard.write_bytes(bytes(data))
    (problem,) = verify(str(prepared))
    assert problem.startswith(f"{shard}: sha256") and "differs from the manifest" in problem


def test_missing_shard(prepared):
    (prepared / "test-000002.tar").unlink()
    assert verify(str(prepared)) == [f"{prepared / 'test-000002.tar'}: missing"]


def test_modified_manifest(prepared):
    manifest = json.loads((prepared / MANIFEST).read_text())
    manifest["options"]["shard_size"] = 3
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    (problem,) = verify(str(prepared))
    assert "manifest was modified" in problem and str(prepared / MANIFEST) in problem


def test_manifest_pointing_at_another_shard_hash(prepared):
    manifest = json.loads((prepared / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    problems = verify(str(prepared))
    assert len(problems) == 2 and "manifest was modified" in problems[0]
    assert "train-000000.tar: sha256" in problems[1] and "same 2 samples" in problems[1]


def test_truncated_shard_and_changed_inputs_and_stray_files(prepared):
    shard = prepared / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    (prepared / INPUTS).write_text("")
    (prepared / "valid-000000.tar").write_bytes(b"")
    problems = verify(str(prepared))
    assert any(str(prepared / INPUTS) in p and "differs" in p for p in problems)
    assert any(p.startswith(str(shard)) and "not a readable tar" in p for p in problems)
    assert any("valid-000000.tar: shard not listed" in p for p in problems)


def test_not_a_prepared_dataset(tmp_path):
    (problem,) = verify(str(tmp_path))
    assert problem.startswith(str(tmp_path / MANIFEST)) and "missing" in problem


def test_cli_exit_codes(prepared):
    ok = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(prepared)],
                        check=False, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout + ok.stderr
    (prepared / "train-000000.tar").unlink()
    bad = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(prepared)],
                         check=False, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "train-000000.tar: missing" in bad.stdout + bad.stderr
