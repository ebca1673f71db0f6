"""Helpers that make small prepared datasets and CLIP caches for the trainer's tests.

* :func:`write_prepared` writes shards and a manifest directly (no raw data, no Dask): fast,
  with exact control of shard sizes, for the data-pipeline tests.
* :func:`write_fake_cache` writes a complete CLIP cache of made-up embeddings (a function of
  the key and the flip) for that data, so the join can be checked without running CLIP.
* :func:`prepare_with_commands` builds a synthetic dataset with the real commands
  (``python -m pipeline synth``, ``normalize``, ``embed --clip-pretrained none``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.core.fsio import Folder
from pipeline.formats.clip_cache import CacheWriter
from pipeline.formats.manifest import canonical_json, read_manifest, version_id, write_manifest
from pipeline.formats.shard_index import build_index, write_index
from pipeline.formats.shards import encode_npy, encode_png, split_shards, write_shard

REPO = Path(__file__).resolve().parents[1]
FAKE_DIM = 8


def sample_key(index: int) -> str:
    return f"v{index:04d}_f000001"


def make_sample(index: int, size: tuple[int, int]) -> dict[str, bytes]:
    """Sample ``index`` (BDDA-style: the label is a stored gaze map): a smooth frame whose left
    third is darker (so a flip shows) and a label with one bright blob left of centre."""
    rng = np.random.default_rng(index)
    height, width = size
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    frame = np.kron(coarse, np.ones((height // 4, width // 4, 1), np.uint8))
    frame[:, : width // 3] //= 2
    yy, xx = np.mgrid[0:height, 0:width]
    label = np.exp(-((yy - height / 2) ** 2 + (xx - width / 4 - index % 5) ** 2) / (width / 4) ** 2)
    return {"__key__": sample_key(index), "png": encode_png(frame),
            "gaze.png": encode_png(np.round(label * 255).astype(np.uint8)),
            "fixations.npy": encode_npy(np.zeros((0, 2))),
            "json": canonical_json({"index": index})}


def write_prepared(root: Path, counts: dict[str, list[int]], size: tuple[int, int] = (32, 32)
                   ) -> Path:
    """A prepared dataset with ``counts[split]`` samples per shard, keys ``vNNNN_f000001``
    numbered across splits; ``size`` is (height, width)."""
    folder = Folder(root)
    folder.makedirs()
    splits, index = {}, 0
    for split, per_shard in counts.items():
        entries = []
        for i, n in enumerate(per_shard):
            samples = [make_sample(index + j, size) for j in range(n)]
            index += n
            entries.append(write_shard(folder, f"{split}-{i:06d}.tar", samples).manifest_entry())
        splits[split] = {"samples": sum(per_shard), "shards": entries}
        splits[split]["index"] = write_index(folder, split, build_index(
            split_shards(str(root), {"splits": splits}, split)))
    write_manifest(folder, {"format": "salmm-prepared", "format_version": 2,
                            "options": {"size": {"height": size[0], "width": size[1]}},
                            "splits": splits})
    return root


def fake_embedding(key: str, flipped: bool) -> np.ndarray:
    """float32 [FAKE_DIM]: a made-up embedding that depends on the key and the flip."""
    number = int(key[1:5])
    return (np.arange(FAKE_DIM, dtype=np.float32) + 100 * number + (0.5 if flipped else 0.0))


def write_fake_cache(prepared: Path, path: Path, chunk: int = 4) -> Path:
    """A complete CLIP cache for ``prepared`` holding :func:`fake_embedding` of every sample."""
    manifest = read_manifest(str(prepared))
    sizes = {s: manifest["splits"][s]["samples"] for s in manifest["splits"]}
    writer = CacheWriter.open(path, {
        "encoder": {"model": "ViT-B-32", "weights": "random:seed=0", "profile": "salmm",
                    "activation": "quickgelu", "open_clip": "test", "embed_dim": FAKE_DIM},
        "dtype": "float32",
        "compute": {"device": "cpu", "autocast": "fp32"},
        "prepared": {"version_id": version_id(manifest),
                     "manifest_sha256": hashlib.sha256(canonical_json(manifest)).hexdigest()},
        "software": {"torch": "test", "open_clip": "test"},
        "splits": sizes,
        "chunk_size": chunk,
    })
    first = 0
    for split in manifest["splits"]:
        keys = [sample_key(first + i) for i in range(sizes[split])]
        first += sizes[split]
        for index in writer.missing_chunks(split):
            start, stop = writer.chunk_range(split, index)
            emb = np.stack([[fake_embedding(k, False), fake_embedding(k, True)]
                            for k in keys[start:stop]])
            writer.write_chunk(split, index, keys[start:stop], emb)
    writer.finish()
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for child Pythons: this repository importable, one intra-op torch thread
    (tiny tensors gain nothing from more, and a busy 2-core machine makes them wait)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}


def run_module(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m <args>`` in the repository with this interpreter; output captured."""
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)


def _checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise RuntimeError(f"{result.args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def prepare_with_commands(work: Path, *, frames: int = 12, size: str = "64x64",
                          shard_size: int = 4) -> Path:
    """A synthetic BDDA dataset run through the real commands: ``synth`` (3 videos, one per
    split), ``normalize --size SIZE --shard-size N``, ``embed --clip-pretrained none`` for the
    train and valid splits into the default cache path. Returns the prepared folder."""
    raw, prepared = work / "raw", work / "prepared"
    _checked(run_module("pipeline", "-q", "synth", "--dataset", "bdda", "--out", str(raw),
                        "--videos", "3", "--frames", str(frames)))
    _checked(run_module("pipeline", "-q", "normalize", "--dataset", "bdda", "--root", str(raw),
                        "--out", str(prepared), "--size", size, "--shard-size", str(shard_size),
                        "--workers", "1"))
    _checked(run_module("pipeline", "-q", "embed", "--prepared", str(prepared),
                        "--clip-pretrained", "none", "--split", "train", "--split", "valid",
                        "--batch-size", "16", "--workers", "1"))
    return prepared
