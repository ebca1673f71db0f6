"""Shared data of the evaluate and predict tests, built once per test session.

A synthetic TrafficGaze dataset made with the real commands (``python -m pipeline synth``,
``normalize --size 64x64``, ``embed --clip-pretrained none`` for the test split), and one
randomly initialised SalMM saved twice: as an official ``model_best_*.tar`` and as a
``salmm.train`` checkpoint (trained, its config says, at 64x64 with cached random CLIP).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.formats.manifest import read_manifest, version_id
from pipeline.formats.shards import decode_label, decode_npy, iter_tar
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
                                "label": decode_label(sample, (64, 64)),
                                "fixations": decode_npy(sample["fixations.npy"])})
        return out


def _run(*args: str) -> None:
    result = run_module(*args)
    if result.returncode != 0:
        raise RuntimeError(f"{result.args} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def _checkpoints(work: Path, prepared: Path, version: str) -> tuple[Path, Path]:
    from salmm.model.checkpoint import save_checkpoint, training_checkpoint
    from salmm.model.net import SalMM
    from salmm.model.official import save_official
    from salmm.training.config import TrainConfig
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = SalMM(backend="builtin")
        # gamma starts at 0 (CLIP ignored); make the embedding matter as a trained model's does
        torch.nn.init.constant_(model.CrossModelAtt.gamma, 1e-3)
    official = work / "model_best_salmm_TrafficGaze_64x64.tar"
    save_official(official, model, epoch=5, valid_loss=0.25)
    cfg = TrainConfig(prepared=str(prepared), cached_clip=True, clip_pretrained=None, size=SIZE)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer = work / "last.pt"
    save_checkpoint(trainer, training_checkpoint(
        model.state_dict(), optimizer, scaler, epoch=2, step=8, valid_loss=0.3,
        best={"epoch": 2, "valid_loss": 0.3}, history=[], config=cfg.as_dict(),
        version=version, cache_identity=None, commit=None))
    return official, trainer


_BUILT: dict[str, Any] = {}


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


def onnx_export(factory: pytest.TempPathFactory) -> Path:
    """The session's ONNX export of the trainer checkpoint (``python -m salmm.export``,
    64x64, with the int8 CLIP measured on the raw frames of video 01; built on first use)."""
    if "onnx" not in _BUILT:
        from salmm.deploy.graphs import export
        from salmm.deploy.options import ExportOptions
        out = factory.mktemp("export") / "onnx"
        data = inference_data(factory)
        export(ExportOptions(checkpoint=str(data.trainer), out=str(out),
                             clip_int8=str(data.raw / "trafficframe" / "01")))
        _BUILT["onnx"] = out
    return _BUILT["onnx"]


def fixation_count(fixations: np.ndarray) -> int:
    """Distinct fixated pixels of the official MATLAB loop's 720x1280 map: the shard holds the
    raw (whole-number here) fixdata values, MATLAB reads them 1-based (so row/column 0 drop)."""
    pts = np.asarray(fixations).reshape(-1, 2) - 1
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < 720) & (pts[:, 1] >= 0) & (pts[:, 1] < 1280)
    return len({tuple(p) for p in pts[inside]})


def write_bdda_prepared(root: Path, frames: int = 3) -> tuple[Path, Path]:
    """A small BDDA-style prepared dataset (test split only, no fixation points, names
    "VVVV/FFFF.jpg") written directly, and a complete CLIP cache for it of random 512-d
    embeddings recorded as the random-seed0 encoder. Returns (prepared, cache)."""
    return write_prepared(root, "bdda", {"test": [(17, frames)]}, cache_split="test",
                          cache_path=root / "clip.zarr")


def write_prepared(root: Path, dataset: str, splits: dict[str, list[tuple[int, int]]], *,
                   cache_split: str | None = None, cache_path: Path | None = None,
                   fixdata: Path | None = None, edge_points: np.ndarray | None = None
                   ) -> tuple[Path, Path | None]:
    """A prepared dataset written directly: per split, (video, frames) pairs; each frame's
    label a Gaussian blob that moves with the frame, its fixation points (TrafficGaze and
    DrFixD-rainy) around the blob on the 720x1280 frame; frames random. ``fixdata``: also
    write the raw ``fixdata{V}.mat`` files the official loops read there. ``cache_split``: a
    complete CLIP cache of that split (random 512-d embeddings recorded as the random-seed0
    encoder) at ``cache_path`` (default: the embed command's default path). ``edge_points``:
    raw (row, col) values added to every frame's fixations (say row 720 or column 1280, which
    the official loop marks and the Python loader drops). Returns (prepared,
    cache)."""
    import hashlib

    from pipeline.core.fsio import Folder
    from pipeline.datasets.matfile import write_fixdata
    from pipeline.formats.clip_cache import CacheWriter
    from pipeline.formats.manifest import canonical_json, write_manifest
    from pipeline.formats.shards import encode_npy, encode_png, write_shard

    rng = np.random.default_rng(11)
    folder = Folder(root)
    folder.makedirs()
    from pipeline.datasets import REGISTRY

    yy, xx = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    bdda = not REGISTRY[dataset].has_fixations      # gaze maps: BDDA, DR(eye)VE, DADA-2000
    scored = REGISTRY[dataset].scores_fixations     # points for AUC / NSS (and DADA-2000's)
    source = REGISTRY[dataset].source_size
    entries, keys, cells = {}, {}, {}
    for split, videos in splits.items():
        samples = []
        for video, count in videos:
            for number in range(1, count + 1):
                cy, cx = 24 + 3 * video + number, 20 + 5 * number + 2 * video
                label = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 80.0)
                points = np.zeros((0, 2))
                if scored:
                    centre = np.array([cy * source[0] / SIZE[0], cx * source[1] / SIZE[1]])
                    points = np.clip(rng.normal(centre, 25, (12, 2)), 1,
                                     [source[0] - 1, source[1] - 1]
                                     ).astype(np.int32).astype(np.float64)
                    if edge_points is not None:
                        points = np.concatenate([points, edge_points])
                    cells.setdefault(video, {})[number] = np.column_stack(
                        [np.zeros((len(points), 2)), points[:, 1], points[:, 0]])
                key = f"v{video:04d}_f{number:06d}"
                name = f"{video:04d}/{number:04d}.jpg" if bdda else \
                    f"{video:02d}/{number:06d}.jpg"
                sample = {
                    "__key__": key,
                    "png": encode_png(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)),
                    "fixations.npy": encode_npy(points),
                    "json": canonical_json({"dataset": dataset, "split": split,
                                            "video": video, "frame": number, "name": name,
                                            "source_size": list(source)})}
                if bdda:
                    sample["gaze.png"] = encode_png(np.round(label * 255).astype(np.uint8))
                samples.append(sample)
        keys[split] = [s["__key__"] for s in samples]
        shard = write_shard(folder, f"{split}-000000.tar", samples).manifest_entry()
        entries[split] = {"samples": len(samples), "shards": [shard]}
    manifest = {"format": "salmm-prepared", "format_version": 2, "dataset": dataset,
                "options": {"size": {"height": SIZE[0], "width": SIZE[1]}}, "splits": entries}
    write_manifest(folder, manifest)
    if fixdata is not None:
        fixdata.mkdir(parents=True, exist_ok=True)
        for video, by_frame in cells.items():
            write_fixdata(fixdata / f"fixdata{video}.mat",
                          [by_frame.get(f, np.zeros((0, 4))) for f in range(1, max(by_frame) + 1)])
    if cache_split is None:
        return root, None
    cache = cache_path or root / "clip" / "ViT-B-32-salmm-random-seed0.zarr"
    writer = CacheWriter.open(str(cache), {
        "encoder": {"model": "ViT-B-32", "weights": "random-seed0", "profile": "salmm",
                    "activation": "quickgelu", "open_clip": "test", "embed_dim": 512},
        "dtype": "float32",
        "compute": {"device": "cpu", "autocast": "fp32"},
        "prepared": {"version_id": version_id(manifest),
                     "manifest_sha256": hashlib.sha256(canonical_json(manifest)).hexdigest()},
        "software": {"torch": "test", "open_clip": "test"},
        "splits": {cache_split: entries[cache_split]["samples"]},
        "chunk_size": 256,
    })
    count = entries[cache_split]["samples"]
    writer.write_chunk(cache_split, 0, keys[cache_split],
                       rng.normal(size=(count, 2, 512)).astype(np.float32))
    writer.finish()
    return root, cache


def stand_in_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``salmm.deploy.graphs.export`` trace nothing: the network and CLIP graphs become
    one-MatMul graphs with the real inputs and outputs, their checks exact. For tests of what
    the export does around the graphs (writing, refusing, int8), not of the graphs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from salmm.deploy import graphs

    def write(path: Path, inputs: list[tuple[str, list[int]]], out: tuple[str, list[int]],
              opset: int) -> None:
        width = sum(math.prod(shape) for _, shape in inputs)
        weight = np.random.default_rng(0).standard_normal((width, math.prod(out[1])))
        nodes = [helper.make_node("Flatten", [name], [f"{name}_flat"]) for name, _ in inputs]
        nodes += [helper.make_node("Concat", [f"{name}_flat" for name, _ in inputs], ["flat"],
                                   axis=1),
                  helper.make_node("MatMul", ["flat", "w"], ["product"]),
                  helper.make_node("Reshape", ["product", "shape"], [out[0]])]
        graph = helper.make_graph(
            nodes, path.stem,
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
             for name, shape in inputs],
            [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])],
            initializer=[numpy_helper.from_array(weight.astype(np.float32), "w"),
                         numpy_helper.from_array(np.asarray(out[1], np.int64), "shape")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]),
                  str(path))

    def network(state_dict, size, path, opset=17, dim=512, **_):
        write(path, [("frame", [1, 3, *size]), ("embedding", [1, dim])],
              ("saliency", [1, 1, *size]), opset)
        return {"graph": 0.0, "onnxruntime": 0.0, "pytorch_float32": 0.0}

    def clip(encoder, size, path, opset=17):
        write(path, [("frame", [1, 3, *size])], ("embedding", [1, 32]), opset)
        return 0.0

    monkeypatch.setattr(graphs, "export_network", network)
    monkeypatch.setattr(graphs, "export_clip", clip)
