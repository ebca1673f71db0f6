"""Bad input never becomes training data: one test per case of the bad-input and crash probe.

Each case damages a raw file, a shard, a manifest, a checkpoint or the output folder the way
the probe did, runs the real entry point, and checks the outcome: one line naming the file and
the problem (or a documented skip-and-report with ``--skip-bad``), no traceback, no output
presented as complete.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import _tiny_jpeg, write_tiny_dataset
from distributed import LocalCluster

from pipeline.errors import BadInputError
from pipeline.images import decode_gray, decode_rgb
from pipeline.manifest import MANIFEST, read_manifest
from pipeline.normalize import normalize


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                      silence_logs=logging.ERROR) as local:
        yield local.scheduler_address


def _cells(frames: int) -> list[np.ndarray]:
    return [np.array([[0, 0, 640.0 + i, 360.0]]) for i in range(frames)]


def trafficgaze(root: Path, frames: int = 4) -> Path:
    """Video 1 (train) and video 2 (valid), ``frames`` frames each."""
    return write_tiny_dataset(root, "trafficgaze", {1: _cells(frames), 2: _cells(frames)},
                              splits={"train": [1], "valid": [2], "test": []})


def bdda(root: Path) -> Path:
    return write_tiny_dataset(root, "bdda", frames={1: 3, 2: 3},
                              splits={"train": [1], "valid": [2], "test": []})


def run(root: Path, out: Path, cluster: str, dataset: str = "trafficgaze", **kwargs):
    return normalize(dataset, root, str(out), dask_address=cluster, progress=False,
                     **{"shard_size": 2, **kwargs})


def refused(call, *needles: str) -> str:
    """The one-line message of the BadInputError ``call()`` raises, checked for ``needles``."""
    with pytest.raises(BadInputError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def corrupt_scan(data: bytes, seed: int = 0) -> bytes:
    """A JPEG whose entropy-coded data has its middle half overwritten with random bytes; the
    headers and the end-of-image marker stay intact (case 1 of the probe)."""
    start = data.index(b"\xff\xda")
    start += 2 + int.from_bytes(data[start + 2:start + 4], "big")
    end = len(data) - 2
    quarter = (end - start) // 4
    noise = np.random.default_rng(seed).integers(0, 255, 2 * quarter, dtype=np.uint8).tobytes()
    return data[:start + quarter] + noise + data[start + 3 * quarter:]


def claimed_size(data: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header claiming ``height`` x ``width`` (case 3)."""
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def png_header(height: int, width: int) -> bytes:
    """A PNG signature and IHDR chunk declaring ``height`` x ``width`` RGB (no pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


# ---- 1. corrupt entropy-coded data -------------------------------------------------------------


@pytest.mark.parametrize("folder", ["camera_frames", "gazemap_frames"])
def test_corrupt_scan_data_is_refused_in_frames_and_gaze_maps(tmp_path, cluster, folder):
    root = bdda(tmp_path / "raw")
    path = root / folder / "0001" / "0002.jpg"
    path.write_bytes(corrupt_scan(path.read_bytes()))
    decode = decode_gray if folder == "gazemap_frames" else decode_rgb
    refused(lambda: decode(path), str(path), "corrupt JPEG")
    refused(lambda: run(root, tmp_path / "out", cluster, "bdda"), str(path), "corrupt JPEG")
    assert not (tmp_path / "out" / MANIFEST).exists()
    result = run(root, tmp_path / "skip", cluster, "bdda", skip_bad=True, max_bad_fraction=0.5)
    skipped = read_manifest(str(tmp_path / "skip"))["splits"]["train"]["skipped"]
    assert result["skipped"] == 1 and skipped[0]["file"] == f"{folder}/0001/0002.jpg"
    assert skipped[0]["problem"].startswith("corrupt JPEG")


# ---- 2. reasons recorded in manifests are deterministic ----------------------------------------


def test_the_same_skip_twice_gives_the_same_version(tmp_path, cluster):
    root = trafficgaze(tmp_path / "raw")
    (root / "trafficframe" / "01" / "000002.jpg").write_bytes(b"GIF89a" + bytes(300))
    one = run(root, tmp_path / "one", cluster, skip_bad=True, max_bad_fraction=0.5)
    two = run(root, tmp_path / "two", cluster, skip_bad=True, max_bad_fraction=0.5)
    assert one["skipped"] == two["skipped"] == 1
    assert one["version_id"] == two["version_id"]
    problem = read_manifest(str(tmp_path / "one"))["splits"]["train"]["skipped"][0]["problem"]
    assert "0x" not in problem and str(tmp_path) not in problem


def test_problems_never_carry_addresses():
    err = BadInputError("f.jpg", "cannot identify image file <_io.BytesIO object at 0x7f3a9c1d2e50>")
    assert err.problem == "cannot identify image file <_io.BytesIO object>"


# ---- 3. image sizes are checked before decoding ------------------------------------------------


@pytest.mark.parametrize("make, problem", [
    (lambda data: claimed_size(data, 30000, 30000), "is 30000x30000, expected 1280x720"),
    (lambda data: claimed_size(data, 60000, 60000), "is 60000x60000, expected 1280x720"),
    (lambda data: png_header(20000, 20000), "is 20000x20000, expected 1280x720"),
    (lambda data: claimed_size(data, 360, 640), "is 640x360, expected 1280x720"),
])
def test_a_frame_of_the_wrong_size_is_refused_before_decoding(tmp_path, cluster, make, problem):
    root = trafficgaze(tmp_path / "raw")
    path = root / "trafficframe" / "01" / "000003.jpg"
    path.write_bytes(make(path.read_bytes()))
    refused(lambda: run(root, tmp_path / "out", cluster), str(path), problem)
    result = run(root, tmp_path / "skip", cluster, skip_bad=True, max_bad_fraction=0.5)
    assert result["skipped"] == 1


def test_no_decoder_allocates_a_bomb(tmp_path):
    path = tmp_path / "bomb.jpg"
    path.write_bytes(png_header(20000, 20000))
    refused(lambda: decode_rgb(path), str(path), "not a size salmm decodes")
    gaze = tmp_path / "map.jpg"
    gaze.write_bytes(claimed_size(_tiny_jpeg(1, gray=True), 30000, 30000))
    refused(lambda: decode_gray(gaze), str(gaze), "not a size salmm decodes")


def test_a_gaze_map_larger_than_the_frame_is_refused(tmp_path, cluster):
    root = bdda(tmp_path / "raw")
    path = root / "gazemap_frames" / "0002" / "0001.jpg"
    path.write_bytes(claimed_size(path.read_bytes(), 1440, 2560))
    refused(lambda: run(root, tmp_path / "out", cluster, "bdda"), str(path),
            "is 2560x1440, larger than the 1280x720 allowed here")


# ---- 4. damaged MATLAB files -------------------------------------------------------------------


@pytest.mark.parametrize("mat_format", ["v5", "v7.3"])
def test_every_single_byte_flip_of_a_fixdata_file_is_read_or_refused(tmp_path, mat_format):
    from pipeline.matfile import load_fixdata, write_fixdata

    path = tmp_path / "fixdata1.mat"
    write_fixdata(path, [np.array([[0, 0, 640.0, 360.0], [0, 0, 10, 20]]), np.zeros((0, 4)),
                         np.array([[1, 2, 3.0, 4.0]])], mat_format)
    good = path.read_bytes()
    rng = np.random.default_rng(14)
    refusals = 0
    for position, value in zip(rng.integers(0, len(good), 400), rng.integers(1, 256, 400)):
        damaged = bytearray(good)
        damaged[position] ^= int(value)
        path.write_bytes(bytes(damaged))
        try:
            cells = load_fixdata(path)
        except BadInputError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
            refusals += 1
            continue
        assert all(isinstance(c, np.ndarray) and c.dtype == np.float64 for c in cells)
    assert refusals > 0


# ---- 5. shards are checked against the manifest as they are read ------------------------------


def flip_byte(shard: Path, ext: str) -> None:
    """Flip one bit in the middle of the first sample's ``ext`` payload (tar structure intact;
    a flip in ``json`` is one no decoder can notice)."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f".{ext}"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_embed_refuses_a_shard_that_changed_after_normalize(tmp_path):
    import zarr

    from pipeline.clip import ClipSpec
    from pipeline.clip_cache import open_cache
    from pipeline.embed import embed_prepared
    from tests._prepared import write_prepared

    prepared = write_prepared(tmp_path / "p", {"train": [2, 2], "valid": [2]})
    flip_byte(prepared / "train-000001.tar", "json")
    out = tmp_path / "c.zarr"
    refused(lambda: embed_prepared(prepared, out, spec=ClipSpec(pretrained=None), chunk_size=2,
                                   workers=1),
            "train-000001.tar: sha256", "differs from the manifest's")
    done = zarr.open_group(str(out), mode="r")["train/done"][:]
    assert done.tolist() == [1, 0]          # the chunk read from the changed shard: not written
    refused(lambda: open_cache(out), "incomplete")


def test_training_data_refuses_a_shard_that_changed_after_normalize(tmp_path):
    from pipeline.shards import split_shards
    from salmm.data import read_shards
    from tests._prepared import write_prepared

    prepared = write_prepared(tmp_path / "p", {"train": [3]})
    flip_byte(prepared / "train-000000.tar", "json")
    shards = split_shards(str(prepared), read_manifest(str(prepared)), "train")
    samples = read_shards(shards)
    assert [next(samples)["__key__"] for _ in range(2)]      # streamed as it is read ...
    refused(lambda: next(samples), "train-000000.tar: sha256")   # ... the last one only if intact
