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

from pipeline.core.errors import BadInputError
from pipeline.formats.images import decode_gray, decode_rgb
from pipeline.formats.manifest import MANIFEST, read_manifest
from pipeline.normalize import normalize


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    """The in-process cluster's address."""
    return dask_cluster.scheduler_address


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
    from pipeline.datasets.matfile import load_fixdata, write_fixdata

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

    from pipeline.encoders.clip import ClipSpec
    from pipeline.encoders.embedding import embed_prepared
    from pipeline.formats.clip_cache import open_cache
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
    from pipeline.formats.shards import split_shards
    from salmm.data.stages import read_shards
    from tests._prepared import write_prepared

    prepared = write_prepared(tmp_path / "p", {"train": [3]})
    flip_byte(prepared / "train-000000.tar", "json")
    shards = split_shards(str(prepared), read_manifest(str(prepared)), "train")
    samples = read_shards(shards)
    assert [next(samples)["__key__"] for _ in range(2)]      # streamed as it is read ...
    refused(lambda: next(samples), "train-000000.tar: sha256")   # ... the last one only if intact


# ---- 6. split files ----------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [1, 1000])
def test_a_repeated_split_entry_is_refused_with_its_lines(tmp_path, cluster, shard_size):
    root = trafficgaze(tmp_path / "raw")
    train = root / "train.json"
    train.write_text(train.read_text() + '"01/000002.jpg"\n')
    refused(lambda: run(root, tmp_path / "out", cluster, shard_size=shard_size),
            f"{train}: line 5: '01/000002.jpg' repeats line 2")
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_a_frame_in_two_splits_is_refused(tmp_path, cluster):
    root = trafficgaze(tmp_path / "raw")
    valid = root / "valid.json"
    valid.write_text('"01/000003.jpg"\n' + valid.read_text())
    refused(lambda: run(root, tmp_path / "out", cluster),
            f"{valid}: line 1: '01/000003.jpg' is also in train.json (line 3)")


# ---- 7. a full disk ---------------------------------------------------------------------------


def test_a_full_disk_at_any_write_is_one_line_and_leaves_no_manifest(tmp_path, cluster,
                                                                    monkeypatch):
    import errno
    import os

    from pipeline.core.errors import OutputError

    root = trafficgaze(tmp_path / "raw", frames=2)
    real_fsync = os.fsync
    calls = {"n": 0, "fail_at": None}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    clean = run(root, tmp_path / "clean", cluster)
    writes = calls["n"]
    assert writes >= 8
    for fail_at in range(1, writes + 1):
        out = tmp_path / f"full-{fail_at}"
        calls.update(n=0, fail_at=fail_at)
        with pytest.raises(OutputError) as info:
            run(root, out, cluster)
        assert "\n" not in str(info.value) and str(out) in str(info.value)
        assert "No space left on device" in str(info.value)
        assert not (out / MANIFEST).exists(), f"a manifest beside a failed run (write {fail_at})"
        calls.update(n=0, fail_at=None)                  # space again: the re-run finishes
        assert run(root, out, cluster)["version_id"] == clean["version_id"]


# ---- 8. a malformed manifest ------------------------------------------------------------------


@pytest.mark.parametrize("damage, problem", [
    (lambda m: m.pop("inputs"), "malformed manifest: inputs.files needs name and sha256"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"),
     "malformed manifest: splits.train.shards[0] needs name, samples and sha256"),
    (lambda m: m["options"].pop("size"), "malformed manifest: options.size needs"),
    (lambda m: m["splits"]["train"].update(samples=99), "its shards hold 4 samples, it says 99"),
])
def test_verify_reports_a_malformed_manifest_in_one_line(tmp_path, cluster, damage, problem):
    import json
    import subprocess
    import sys

    from tests._prepared import REPO, subprocess_env

    root = trafficgaze(tmp_path / "raw")
    run(root, tmp_path / "p", cluster)
    path = tmp_path / "p" / MANIFEST
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(tmp_path / "p")],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert problem in errors[0] and str(path) in errors[0]


# ---- 9. resuming from a checkpoint that does not fit -------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, commands_prepared):
    """A prepared dataset and a one-epoch run on it (a subprocess, as a user runs it)."""
    from tests._prepared import run_module

    prepared = commands_prepared
    run = tmp_path_factory.mktemp("trained") / "run"
    result = run_module("salmm.train", "--cached-clip", "--prepared", str(prepared),
                        "--clip-pretrained", "none", "--size", "64x64", "--batch-size", "4",
                        "--epochs", "1", "--workers", "0", "--out", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    return prepared, run


@pytest.mark.parametrize("damage, problem", [
    (lambda c: c["state_dict"].update({"final.weight": c["state_dict"]["final.weight"][:, :4]}),
     "state_dict does not match SalMM: 1 wrong shape (final.weight [1, 4, 1, 1] vs model"),
    (lambda c: c["state_dict"].pop("encoder1.0.weight"), "1 missing (encoder1.0.weight)"),
    (lambda c: c.pop("config"), "not a complete salmm training checkpoint (missing config)"),
])
def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line(trained, tmp_path, damage,
                                                                problem):
    import torch

    from tests._prepared import run_module

    prepared, run = trained
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    damage(checkpoint)
    bad = tmp_path / "last.pt"
    torch.save(checkpoint, bad)
    result = run_module("salmm.train", "--cached-clip", "--prepared", str(prepared),
                        "--clip-pretrained", "none", "--size", "64x64", "--batch-size", "4",
                        "--epochs", "2", "--workers", "0", "--resume", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and str(bad) in errors[0] and problem in errors[0], errors


# ---- 10. a truncated video ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def inference(tmp_path_factory):
    from tests._inference_data import inference_data

    return inference_data(tmp_path_factory)


def test_a_truncated_video_is_refused_unless_the_user_opts_in(inference, tmp_path, caplog):
    import cv2

    from salmm.deploy.options import PredictOptions
    from salmm.deploy.pictures import predict
    data = inference
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (96, 64))
    rng = np.random.default_rng(0)
    for i in range(8):
        writer.write(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    writer.release()
    video.write_bytes(video.read_bytes()[: video.stat().st_size * 6 // 10])
    options = PredictOptions(checkpoint=str(data.trainer), input=str(video),
                             out=str(tmp_path / "out"))
    refused(lambda: predict(options), str(video), "of the 8 frames it announces")
    with caplog.at_level(logging.WARNING, logger="salmm.data.sources"):
        written = predict(PredictOptions(**{**options.__dict__, "allow_short_video": True,
                                            "out": str(tmp_path / "short")}))
    read = len([p for p in written if p.suffix == ".png"])
    assert 0 < read < 8 and f"read {read} of the 8 frames it announces" in caplog.text


# ---- 11. one writer per output -----------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, cluster):
    from pipeline.core.errors import OutputError
    from pipeline.core.fsio import Folder
    from pipeline.encoders.clip import ClipSpec
    from pipeline.encoders.embedding import embed_prepared

    root = trafficgaze(tmp_path / "raw")
    out = tmp_path / "out"
    with Folder(out).lock():                     # another run holds the folder
        for overwrite in (False, True):
            with pytest.raises(OutputError) as info:
                run(root, out, cluster, overwrite=overwrite)
            assert f"{out}: another run is writing here (pid" in str(info.value)
    assert not (out / MANIFEST).exists()
    run(root, out, cluster)                      # free again
    with (Folder(out / "clip").lock("c.zarr.lock"),
          pytest.raises(OutputError, match="c.zarr: another run is writing here")):
        embed_prepared(out, out / "clip" / "c.zarr", spec=ClipSpec(pretrained=None), workers=1)


# ---- 13. small things ---------------------------------------------------------------------------


def test_the_stale_cache_message_leads_to_a_run_that_works(tmp_path, cluster):
    from pipeline.encoders.clip import ClipSpec
    from pipeline.encoders.embedding import embed_prepared
    from pipeline.formats.clip_cache import open_cache, open_checked_cache

    root = trafficgaze(tmp_path / "raw")
    out = tmp_path / "p"
    spec = ClipSpec(pretrained=None)
    run(root, out, cluster)
    cache = embed_prepared(out, spec=spec, workers=1)
    run(root, out, cluster, shard_size=3, overwrite=True)      # another version of the data
    manifest = read_manifest(str(out))
    refused(lambda: open_checked_cache(None, str(out), manifest, spec.identity(), ["train"]),
            "made from prepared dataset version", "re-run `python -m pipeline embed`")
    assert embed_prepared(out, spec=spec, workers=1) == cache  # does what the message says
    open_cache(cache, prepared=out)


def test_a_refused_normalize_leaves_the_complete_output_as_it_was(tmp_path, cluster):
    root = trafficgaze(tmp_path / "raw")
    out = tmp_path / "p"
    run(root, out, cluster)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused(lambda: run(root, out, cluster, shard_size=3), "use --overwrite")
    frame = root / "trafficframe" / "01" / "000001.jpg"
    frame.write_bytes(_tiny_jpeg(99))                           # changed since the shard
    refused(lambda: run(root, out, cluster), str(frame), "changed since")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / ".progress").exists()


# ---- 12. undefined validation metrics ----------------------------------------------------------


def test_validation_means_skip_frames_with_an_all_zero_label(tmp_path):
    import torch

    from pipeline.core.fsio import Folder
    from pipeline.encoders.clip import ClipSpec, cached_encoder
    from pipeline.formats.manifest import write_manifest
    from pipeline.formats.shards import encode_png, split_shards, write_shard
    from salmm.data.stages import SaliencyShards, make_loader
    from salmm.model.net import SalMM
    from salmm.training import loop as train_loop
    from salmm.training import runtime as train_runtime
    from tests._prepared import make_sample, write_prepared

    prepared = write_prepared(tmp_path / "p", {"valid": [3]})
    samples = [make_sample(i, (32, 32)) for i in range(3)]
    samples[1]["gaze.png"] = encode_png(np.zeros((32, 32), np.uint8))     # nobody looked
    manifest = read_manifest(str(prepared))
    entry = write_shard(Folder(prepared), "valid-000000.tar", samples).manifest_entry()
    manifest["splits"]["valid"]["shards"] = [entry]
    write_manifest(Folder(prepared), {k: v for k, v in manifest.items() if k != "version_id"})
    data = SaliencyShards(split_shards(str(prepared), read_manifest(str(prepared)), "valid"),
                          split="valid", train=False, seed=0, batch_size=2, size=(32, 32))
    torch.manual_seed(0)
    model = SalMM(clip=cached_encoder(ClipSpec(pretrained=None)))
    rt = train_runtime.Runtime(rank=0, world_size=1, device=torch.device("cpu"), autocast=None)
    scores = train_loop.validate(model, make_loader(data, 0, False), rt)
    assert scores["valid_samples"] == 3 and scores["valid_undefined"] == 1
    assert all(np.isfinite(scores[m]) for m in ("CC", "SIM", "KLD"))


def test_progress_off_a_terminal_is_log_lines_not_carriage_returns(monkeypatch, caplog):
    from pipeline.core import progress as progress_module

    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(progress_module, "QUIET_UNDER_S", 0.0)
    with (caplog.at_level(logging.INFO, logger="progress"),
          progress_module.progress(total=3, desc="normalize", unit="frame") as bar):
        assert isinstance(bar, progress_module.LogProgress)
        bar.every_s = 0.0
        for _ in range(3):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("normalize: 3/3 frame (") and all("\r" not in x for x in lines)


def test_evaluate_says_how_many_frames_a_metric_skips(inference, tmp_path):
    import json

    from salmm.evaluation.evaluator import evaluate
    from salmm.evaluation.options import EvalOptions
    data = inference
    summary = evaluate(EvalOptions(checkpoint=str(data.trainer), prepared=str(data.prepared),
                                   out=str(tmp_path), cached_clip=True, workers=0))
    skipped = {m: k for m, k in summary["nan_frames"].items() if k}
    assert skipped, "the synthetic test split has frames with a single fixation (AUC_B NaN)"
    table = (tmp_path / "results.md").read_text()
    for metric, count in skipped.items():
        assert f"{metric} on {count}" in table
    assert "(defined frames; undefined: " in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(" in line]
    assert "defined frames" in rows[0] and "official mean: NaN as MATLAB" in rows[1]
    assert "NaN" not in rows[0] and "NaN" in rows[1]
    assert json.loads((tmp_path / "summary.json").read_text())["nan_frames"] == \
        summary["nan_frames"]
