"""Shard stages: field encoders, the deterministic tar writer, atomic shard commit."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.fsio import Folder
from pipeline.manifest import canonical_json
from pipeline.shards import (
    TAR_MTIME,
    decode_label_png,
    decode_npy,
    encode_jpeg,
    encode_label_png,
    encode_npy,
    iter_tar,
    shard_name,
    write_shard,
    write_tar,
)


def _samples(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        label = rng.random((16, 24)).astype(np.float32)
        out.append({
            "__key__": f"v0001_f{i + 1:06d}",
            "json": canonical_json({"frame": i + 1}),
            "jpg": encode_jpeg(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)),
            "saliency.png": encode_label_png(label),
            "fixations.npy": encode_npy(np.array([[i, 2 * i]], dtype=np.int32)),
        })
    return out


def test_label_png_is_16_bit_and_within_1e4():
    rng = np.random.default_rng(1)
    label = rng.random((32, 40)).astype(np.float32)
    label[0, 0], label[0, 1] = 0.0, 1.0
    data = encode_label_png(label)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "I;16" and im.size == (40, 32)
    back = decode_label_png(data)
    assert back.dtype == np.float32 and back.shape == label.shape
    assert np.abs(back - label).max() <= 0.5 / 65535 + 1e-7
    assert back[0, 0] == 0.0 and back[0, 1] == 1.0


def test_jpeg_is_444_quality_95_and_stable():
    rgb = np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    data = encode_jpeg(rgb)
    assert data == encode_jpeg(rgb.copy())
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (32, 24) and im.mode == "RGB"
        assert im.layer[0][1:3] == im.layer[1][1:3] == (1, 1)  # no chroma subsampling
    with pytest.raises(ValueError):
        encode_jpeg(rgb[..., 0])


def test_npy_round_trip_keeps_int32_shape():
    points = np.array([[1, 2], [3, 4]], dtype=np.int32)
    back = decode_npy(encode_npy(points))
    assert back.dtype == np.int32 and np.array_equal(back, points)
    empty = decode_npy(encode_npy(np.zeros((0, 2), np.int32)))
    assert empty.shape == (0, 2)


def test_tar_is_deterministic_with_fixed_headers_and_sorted_members():
    first, second = io.BytesIO(), io.BytesIO()
    assert write_tar(_samples(), first) == 3
    write_tar(_samples(), second)
    assert first.getvalue() == second.getvalue()
    first.seek(0)
    with tarfile.open(fileobj=first) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:5]] == [
        "v0001_f000001.fixations.npy", "v0001_f000001.jpg", "v0001_f000001.json",
        "v0001_f000001.saliency.png", "v0001_f000002.fixations.npy"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (TAR_MTIME, 0, 0, "", "", 0o444)}


def test_tar_rejects_repeated_or_dotted_keys():
    with pytest.raises(ValueError, match="key"):
        write_tar([{"__key__": "a", "json": b"{}"}, {"__key__": "a", "json": b"{}"}], io.BytesIO())
    with pytest.raises(ValueError, match="key"):
        write_tar([{"__key__": "a.b", "json": b"{}"}], io.BytesIO())


def test_iter_tar_and_webdataset_read_what_was_written(tmp_path):
    samples = _samples()
    info = write_shard(Folder(tmp_path), shard_name("train", 0), samples)
    path = tmp_path / "train-000000.tar"
    assert info.name == "train-000000.tar" and info.samples == 3
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.size == path.stat().st_size
    with open(path, "rb") as f:
        assert list(iter_tar(f)) == samples
    dataset = wds.WebDataset(str(path), shardshuffle=False).decode(
        wds.handle_extension("saliency.png", decode_label_png), "rgb8")
    got = list(dataset)
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    assert got[0]["jpg"].shape == (16, 24, 3) and got[0]["saliency.png"].dtype == np.float32
    assert np.array_equal(got[2]["fixations.npy"], [[2, 4]])


def test_write_shard_leaves_nothing_when_the_samples_fail(tmp_path):
    def broken():
        yield from _samples(2)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        write_shard(Folder(tmp_path), "train-000000.tar", broken())
    assert list(tmp_path.iterdir()) == []


def test_write_shard_to_memory_filesystem():
    folder = Folder("memory://shards-test")
    info = write_shard(folder, "valid-000000.tar", _samples(2))
    assert folder.listdir() == ["valid-000000.tar"]
    assert folder.sha256("valid-000000.tar") == info.sha256
    folder.remove("")
