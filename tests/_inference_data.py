"""Shared data of the evaluate and predict tests, built once per test session.

A synthetic TrafficGaze dataset made with the real commands (``python -m pipeline synth``,
``normalize --size 64x64``, ``embed --clip-pretrained none`` for the test split), and one
randomly initialised SalMM saved twice: as an official ``model_best_*.tar`` and as a
``salmm.train`` checkpoint (trained, its config says, at 64x64 with cached random CLIP).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.manifest import read_manifest, version_id
from pipeline.shards import decode_label_png, decode_npy, iter_tar
from tests._prepared import run_module

VIDEOS, FRAMES = 3, 9          # video 3 is the test split: frames 6..9 listed
SIZE = (64, 64)


@dataclass(frozen=True)
class InferenceData:
    raw: Path                  # the synthetic raw dataset
    prepared: Path             # normalized at 64x64, shards of 3 entries
    cache: Path                # CLIP cache of the test split (random weights)
    official: Path             # official-format checkpoint
    trainer: Path              # salmm.train checkpoint, same weights
    version: str               # prepared dataset version id

    def test_samples(self) -> list[dict]:
        """Test samples in shard order: key, name, label [64, 64], fixations [N, 2]."""
        manifest = read_manifest(str(self.prepared))
        out = []
        for shard in manifest["splits"]["test"]["shards"]:
            with open(self.prepared / shard["name"], "rb") as f:
                for sample in iter_tar(f):
                    out.append({"key": sample["__key__"],
                                "name": json.loads(sample["json"])["name"],
                                "label": decode_label_png(sample["saliency.png"]),
                                "fixations": decode_npy(sample["fixations.npy"])})
        return out


def _run(*args: str) -> None:
    result = run_module(*args)
    if result.returncode != 0:
        raise RuntimeError(f"{result.args} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def _checkpoints(work: Path, prepared: Path, version: str) -> tuple[Path, Path]:
    from salmm.checkpoint import save_checkpoint
    from salmm.model import SalMM
    from salmm.official import save_official
    from salmm.options import TrainConfig
    from salmm.train import make_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = SalMM(backend="torch")
        # gamma starts at 0 (CLIP ignored); make the embedding matter as a trained model's does
        torch.nn.init.constant_(model.CrossModelAtt.gamma, 1e-3)
    official = work / "model_best_salmm_TrafficGaze_64x64.tar"
    save_official(official, model, epoch=5, valid_loss=0.25)
    cfg = TrainConfig(prepared=str(prepared), cached_clip=True, clip_pretrained=None, size=SIZE)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer = work / "last.pt"
    save_checkpoint(trainer, make_checkpoint(
        model, optimizer, scaler, epoch=2, step=8, valid_loss=0.3,
        best={"epoch": 2, "valid_loss": 0.3}, history=[], cfg=cfg, version=version,
        cache_identity=None, commit=None))
    return official, trainer


_BUILT: dict[str, InferenceData] = {}


def inference_data(factory: pytest.TempPathFactory) -> InferenceData:
    """The session's :class:`InferenceData` (built on first use)."""
    if "data" not in _BUILT:
        work = factory.mktemp("inference")
        raw, prepared = work / "raw", work / "prepared"
        _run("pipeline", "-q", "synth", "--dataset", "trafficgaze", "--out", str(raw),
             "--videos", str(VIDEOS), "--frames", str(FRAMES))
        _run("pipeline", "-q", "normalize", "--dataset", "trafficgaze", "--root", str(raw),
             "--out", str(prepared), "--size", f"{SIZE[1]}x{SIZE[0]}", "--shard-size", "3",
             "--workers", "1")
        _run("pipeline", "-q", "embed", "--prepared", str(prepared), "--clip-pretrained", "none",
             "--split", "test", "--batch-size", "8")
        version = version_id(read_manifest(str(prepared)))
        official, trainer = _checkpoints(work, prepared, version)
        cache = prepared / "clip" / "ViT-B-32-salmm-random-seed0.zarr"
        assert cache.exists()
        _BUILT["data"] = InferenceData(raw, prepared, cache, official, trainer, version)
    return _BUILT["data"]


def fixation_count(fixations: np.ndarray) -> int:
    """Distinct fixated pixels inside the 720x1280 frame (what the fixation metrics see)."""
    pts = np.asarray(fixations).reshape(-1, 2)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < 720) & (pts[:, 1] >= 0) & (pts[:, 1] < 1280)
    return len({tuple(p) for p in pts[inside]})
