"""Shard stages: field encoders, the deterministic tar writer, atomic shard commit."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats.labels import fixation_label, loader_points
from pipeline.formats.shard_index import SampleReader, build_index, scan_shard
from pipeline.formats.shards import (
    TAR_MTIME,
    Shard,
    decode_frame,
    decode_label,
    decode_npy,
    encode_jpeg,
    encode_npy,
    encode_sample,
    iter_tar,
    shard_name,
    write_shard,
    write_tar,
)


def _samples(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        out.append(encode_sample(
            f"v0001_f{i + 1:06d}", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8),
            np.array([[i + 0.5, 2 * i], [800.0, -3.0]]), {"frame": i + 1, "source_size": [720,
                                                                                       1280]}))
    return out


def test_frames_are_stored_losslessly_and_labels_come_from_the_recorded_points():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    points = np.array([[100.7, 200.2], [719.9, 1279.5], [720.0, 5.0], [-0.5, 3.0]])
    sample = {**encode_sample("v0001_f000001", frame, points, {"source_size": [720, 1280]}),
              "__url__": "s"}
    assert set(sample) == {"__key__", "png", "fixations.npy", "json", "__url__"}
    np.testing.assert_array_equal(decode_frame(sample, (32, 40)), frame)       # lossless
    np.testing.assert_array_equal(decode_npy(sample["fixations.npy"]), points)  # as recorded
    # the loader truncates toward zero and keeps rows 0..719, columns 0..1279
    assert loader_points(points).tolist() == [[100, 200], [719, 1279], [0, 3]]
    np.testing.assert_array_equal(decode_label(sample, (32, 40)),
                                  fixation_label(loader_points(points), (32, 40)))
    gaze = rng.integers(0, 256, (32, 40), dtype=np.uint8)
    bdda = {**encode_sample("v0001_f000002", frame, np.zeros((0, 2)), {}, gaze=gaze),
            "__url__": "s"}
    np.testing.assert_array_equal(decode_label(bdda, (32, 40)), gaze.astype(np.float32) / 255)
    lossy = encode_sample("v0001_f000003", frame, points, {}, codec="jpeg95")
    assert "jpg" in lossy and "png" not in lossy


def test_jpeg_is_444_quality_95_and_stable():
    rgb = np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    data = encode_jpeg(rgb)
    assert data == encode_jpeg(rgb.copy())
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (32, 24) and im.mode == "RGB"
        assert im.layer[0][1:3] == im.layer[1][1:3] == (1, 1)  # no chroma subsampling
    with pytest.raises(ValueError):
        encode_jpeg(rgb[..., 0])


def test_npy_round_trip_keeps_dtype_and_shape():
    points = np.array([[1.25, 2], [3, 4]])
    back = decode_npy(encode_npy(points))
    assert back.dtype == np.float64 and np.array_equal(back, points)
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
    assert [m.name for m in members[:4]] == [
        "v0001_f000001.fixations.npy", "v0001_f000001.json", "v0001_f000001.png",
        "v0001_f000002.fixations.npy"]
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
    dataset = wds.WebDataset(str(path), shardshuffle=False).decode("rgb8")
    got = list(dataset)
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    assert got[0]["png"].shape == (16, 24, 3)
    assert np.array_equal(got[2]["fixations.npy"], [[2.5, 4], [800, -3]])


def test_index_gives_random_access_to_the_exact_bytes_and_refuses_a_changed_span(tmp_path):
    folder = Folder(tmp_path)
    shards, first = [], 0
    for i, n in enumerate((3, 2)):
        info = write_shard(folder, shard_name("train", i), _samples(n))
        shards.append(Shard(info.url, info.samples, info.sha256, first))
        first += n
    index = build_index(shards)
    assert index["shard"].tolist() == [0, 0, 0, 1, 1]
    assert (index["offset"][:3] % 512 == 0).all()
    reader = SampleReader(shards, index)
    streamed = []
    for shard in shards:
        with open(shard.url, "rb") as f:
            streamed.extend(iter_tar(f))
    for row in (4, 0, 2, 3, 1):                                     # any order
        got = reader.read(row)
        assert got["__index__"] == row
        assert {k: v for k, v in got.items() if not k.startswith("__")} == \
            {k: v for k, v in streamed[row].items() if k != "__key__"}
    reader.close()
    # one flipped byte inside sample 1's span
    path = tmp_path / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[int(index["offset"][1]) + 600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="differs from the index's sha256"):
        SampleReader(shards, index).read(1)
    with pytest.raises(BadInputError, match="differs from the manifest's sha256"):
        scan_shard(shards[0], 0)


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


def test_index_keeps_digests_that_end_in_zero_bytes(tmp_path):
    from pipeline.formats.shard_index import INDEX_DTYPE, write_index

    index = np.zeros(1, dtype=INDEX_DTYPE)
    digest = bytes(range(1, 31)) + b"\x00\x00"
    index[0]["sha256"] = np.frombuffer(digest, np.uint8)
    write_index(Folder(tmp_path), "train", index)
    back = np.load(tmp_path / "train-index.npy")
    assert back[0]["sha256"].tobytes() == digest
