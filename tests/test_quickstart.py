"""The README's main command in smoke mode: tiny synthetic data, one epoch, and no way to the CLIP
weights (an empty hub cache, a hub endpoint nobody answers), so it goes on with random ones.

Runs ``python -m flows.quickstart`` exactly as a user would (a real Prefect server and deployment
server, the real deployment run, trainer, evaluation and predictions) and checks every artifact it
promises; on real data (``--root``) the missing weights stop it before anything starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.formats.manifest import read_manifest, version_id

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SALMM_"))}
    env.update(extra)
    return env


def _offline(tmp_path: Path) -> dict[str, str]:
    """No CLIP weights to be had: an empty hub cache and an endpoint nobody listens on."""
    return _env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")


def quickstart(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """``python -m flows.quickstart ARGS`` as a user runs it, with no way to the CLIP weights."""
    return subprocess.run(
        [sys.executable, "-m", "flows.quickstart", *args],
        cwd=REPO,
        env=_offline(tmp_path),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _listening(url: str) -> bool:
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, int(port))) == 0


@pytest.mark.slow
def test_quickstart_smoke_run_leaves_every_promised_artifact(tmp_path: Path) -> None:
    work = tmp_path / "qs"
    run = quickstart(
        tmp_path,
        *("--work", str(work), "--epochs", "1", "--videos", "3", "--frames", "7"),
        *("--size", "64x64", "--batch-size", "4", "--predict-frames", "3"),
        timeout=900,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "random CLIP weights: a smoke run" in "".join(run.stderr.splitlines(True)[:3])
    assert "Retrying" not in output

    summary = output[output.index("salmm quickstart finished") :]
    assert "SYNTHETIC" in summary
    assert output.count("| | AUC_B |") == 1, "the metrics table is printed once, at the end"
    fields = dict(
        re.findall(
            r"^  (raw data|Prefect UI|version id|prepared data|CLIP cache|run folder)\s+(\S+)",
            summary,
            re.MULTILINE,
        )
    )
    prepared, run_dir = Path(fields["prepared data"]), Path(fields["run folder"])
    assert fields["version id"] == version_id(read_manifest(str(prepared)))
    assert (Path(fields["raw data"]) / "SYNTHETIC.txt").exists()
    assert Path(fields["CLIP cache"]).is_dir()
    assert fields["Prefect UI"].startswith("http://127.0.0.1:")
    assert not _listening(fields["Prefect UI"]), "the quickstart left its Prefect server running"

    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    results = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    assert results["dataset"]["version_id"] == fields["version id"]
    assert re.search(r"^  CLIP weights    random CLIP weights: a smoke run", summary, re.MULTILINE)
    assert "random CLIP weights: a smoke run" in (run_dir / "evaluation" / "results.md").read_text()
    assert results["note"] == "random CLIP weights: a smoke run"
    assert json.loads((run_dir / "config.json").read_text())["note"] == results["note"]
    assert all(math.isfinite(results["means"][m]) for m in ("CC", "SIM", "KLD"))
    assert "| AUC_B | AUC_J | NSS | CC | SIM | KLD |" in summary
    pictures = re.findall(r"^  (/\S+\.(?:png|gif|mp4))$", summary, re.MULTILINE)
    assert any(p.endswith("curves.png") for p in pictures)
    assert any("animation." in p for p in pictures)
    assert all(Path(p).stat().st_size > 0 for p in pictures)


def test_quickstart_on_real_data_without_clip_weights_says_how_to_proceed(tmp_path: Path) -> None:
    raw = tmp_path / "BDDA"
    subprocess.run(
        [sys.executable, "-m", "pipeline", "-q", "synth", "--dataset", "bdda", "--out", str(raw),
         "--videos", "3", "--frames", "4"],
        cwd=REPO, env=_env(), check=True, capture_output=True,
    )
    run = quickstart(tmp_path, "--work", str(tmp_path / "qs"), "--root", str(raw), timeout=300)
    assert run.returncode != 0
    assert "--clip-pretrained /path/to/ViT-B-32.pt" in run.stderr
    assert "--clip-pretrained none" in run.stderr
    assert "127.0.0.1:9 cannot be reached" in run.stderr
    assert "Retrying" not in run.stderr + run.stdout
    assert not (tmp_path / "qs").exists(), "nothing should start before the weights are there"
