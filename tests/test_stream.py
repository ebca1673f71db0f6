"""python -m salmm.stream: every input kind, semantic refresh, both backends, one-line errors."""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import threading
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import pytest

from pipeline.core.errors import BadInputError
from salmm.data.sources import image_items
from salmm.deploy import live as stream_module
from salmm.deploy.live import (
    RANDOM_CAVEAT,
    OnnxRunner,
    Report,
    TorchRunner,
    run_loop,
    stream,
)
from salmm.deploy.options import StreamOptions
from salmm.model.loading import load_model
from salmm.render import overlay
from salmm.stream import main
from tests._inference_data import InferenceData, inference_data, onnx_export

FRAMES = range(6, 10)          # the test video's frames in the synthetic raw dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


def _frame_files(data: InferenceData) -> list[Path]:
    return [data.raw / "trafficframe" / "03" / f"{n:06d}.jpg" for n in FRAMES]


def _video(data: InferenceData, path: Path, repeat: int = 1) -> Path:
    """An MJPG AVI of the test video's frames (96x64, 5 fps), ``repeat`` times over."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (96, 64))
    for _ in range(repeat):
        for file in _frame_files(data):
            writer.write(cv2.resize(cv2.imread(str(file)), (96, 64),
                                    interpolation=cv2.INTER_AREA))
    writer.release()
    return path


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_video_to_overlay_video_and_report(data: InferenceData, tmp_path: Path):
    out = tmp_path / "overlay.mp4"
    summary = stream(StreamOptions(checkpoint=str(data.trainer),
                                   input=str(_video(data, tmp_path / "in.avi")), out=str(out)))
    assert summary["frames"] == 4 and summary["clip_frames"] == 4
    assert summary["size"] == {"height": 64, "width": 64}
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
    assert summary["fps"] > 0
    assert json.loads((tmp_path / "overlay.mp4.json").read_text()) == summary
    frames = list(iio.imiter(out))
    # drawn at the input's size, under the banner random CLIP weights get
    banner = overlay.banner(np.zeros((1, 96, 3), np.uint8), RANDOM_CAVEAT).shape[0] - 1
    assert len(frames) == 4 and frames[0].shape[:2] == (-(-(64 + banner) // 16) * 16, 96)
    red = frames[0][: banner // 2, :8].reshape(-1, 3).mean(axis=0)
    assert red[0] > 150 and red[1] < 80                               # the banner is there
    assert iio.immeta(out)["fps"] == pytest.approx(5)                # the input's frame rate


class _Counting:
    """A runner that records which frames CLIP saw."""

    def __init__(self, runner: TorchRunner) -> None:
        self.runner, self.embedded = runner, []

    def embed(self, frame: np.ndarray) -> np.ndarray:
        self.embedded.append(frame)
        return self.runner.embed(frame)

    def saliency(self, frame: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        return self.runner.saliency(frame, embedding)


def test_refresh_every_k_reuses_the_last_embedding_exactly(data: InferenceData):
    """K = 3 over 8 frames: CLIP on frames 0, 3, 6; each prediction is exactly SalMM of the
    frame with the embedding of the last refreshed frame."""
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    runner = _Counting(TorchRunner(loaded))
    items = list(image_items(_frame_files(data) * 2, (64, 64)))
    got = []
    report = run_loop(runner, iter(items), 3,
                      lambda item, saliency, status: got.append(saliency))
    assert report.clip_frames == 3 and len(report.latency_ms) == 8
    assert [id(f) for f in runner.embedded] == [id(items[i].model_input) for i in (0, 3, 6)]
    for number, item in enumerate(items):
        embedding = runner.runner.embed(items[number - number % 3].model_input)
        np.testing.assert_array_equal(got[number], runner.runner.saliency(item.model_input,
                                                                          embedding))
    assert not np.array_equal(got[1], runner.runner.saliency(items[1].model_input,
                                                             runner.runner.embed(
                                                                 items[1].model_input)))


def test_reading_ahead_predicts_what_the_plain_loop_predicts(data: InferenceData):
    """CLIP in two threads up to 4 items ahead and drawing in a thread of its own (K = 3 over 8
    frames, and K = 1): the same frames embedded, the same predictions bit for bit, in the
    same order, as CLIP and drawing in the loop."""
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    items = list(image_items(_frame_files(data) * 2, (64, 64)))
    for k in (3, 1):
        runs = []
        for ahead, workers, behind in ((0, 1, False), (4, 2, True)):
            runner, got = _Counting(TorchRunner(loaded)), []
            report = run_loop(runner, iter(items), k,
                              lambda item, saliency, status, out=got: out.append(saliency),
                              ahead=ahead, clip_workers=workers, behind=behind)
            assert report.clip_frames == len(range(0, 8, k)) and len(report.latency_ms) == 8
            assert sorted(id(f) for f in runner.embedded) == sorted(
                id(items[i].model_input) for i in range(0, 8, k))
            runs.append(got)
        for plain, ahead in zip(*runs):
            np.testing.assert_array_equal(plain, ahead)


def test_reading_ahead_ends_as_the_plain_loop_ends(data: InferenceData):
    """A source that fails after 5 frames: the 5 are drawn, then its error; CLIP failing on a
    frame: the frames before it are drawn, then CLIP's error; drawing failing (in its thread)
    on a frame: its error, the frames before drawn; ``stopped`` ends the loop before the next
    frame; no CLIP or drawing thread is left running."""
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    items = list(image_items(_frame_files(data) * 2, (64, 64)))

    def failing(after: int):
        yield from items[:after]
        raise BadInputError("drive.avi", "frame 5 cannot be decoded")

    class Refusing(_Counting):
        def embed(self, frame: np.ndarray) -> np.ndarray:
            if frame is items[6].model_input:
                raise RuntimeError("CLIP failed")
            return super().embed(frame)

    for source, runner, error in ((failing(5), TorchRunner(loaded), BadInputError),
                                  (iter(items), Refusing(TorchRunner(loaded)), RuntimeError)):
        drawn = []
        with pytest.raises(error):
            run_loop(runner, source, 2,
                     lambda item, saliency, status, out=drawn: out.append(item),
                     ahead=4, clip_workers=2)
        assert drawn == items[:5] if error is BadInputError else drawn == items[:6]

    def failing_draw(item, saliency, status):
        if item is items[3]:
            raise OSError("disk full")
        drawn.append(item)
    drawn = []
    with pytest.raises(OSError, match="disk full"):
        run_loop(TorchRunner(loaded), iter(items), 2, failing_draw, ahead=4, clip_workers=2,
                 behind=True)
    assert drawn == items[:3]
    drawn = []
    report = run_loop(TorchRunner(loaded), iter(items), 2,
                      lambda item, saliency, status: drawn.append(item), ahead=4,
                      stopped=lambda: len(drawn) == 3)
    assert drawn == items[:3] and len(report.latency_ms) == 3
    assert not [t for t in threading.enumerate() if t.name.startswith(("clip", "sink"))]


def test_onnx_backend_matches_torch(data: InferenceData, tmp_path_factory, tmp_path: Path):
    folder = onnx_export(tmp_path_factory)
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    torch_runner = TorchRunner(loaded)
    onnx_runner = OnnxRunner(folder, threads=1, loaded=loaded, size=(64, 64))
    assert onnx_runner.engine in OnnxRunner.ENGINES  # the faster of the two, timed
    only_onnx = OnnxRunner(folder, threads=1)
    assert only_onnx.engine == "onnxruntime"
    for item in image_items(_frame_files(data), (64, 64)):
        embedding = onnx_runner.embed(item.model_input)
        want = torch_runner.embed(item.model_input)
        assert np.abs(embedding - want).max() <= 1e-3 * np.abs(want).max()
        for runner in (onnx_runner, only_onnx):
            got = runner.saliency(item.model_input, embedding)
            assert got.shape == (64, 64)
            assert np.abs(got - torch_runner.saliency(item.model_input, want)).max() <= 1e-3

    summary = stream(StreamOptions(checkpoint=str(data.trainer), input=str(
        _video(data, tmp_path / "in.avi")), backend="onnx", onnx=str(folder), refresh_every=4,
        out=str(tmp_path / "o.mp4"), threads=1))
    assert summary["backend"] == "onnx" and summary["frames"] == 4
    assert summary["salmm_engine"] in OnnxRunner.ENGINES and summary["clip_int8"] is False

    int8 = OnnxRunner(folder, threads=1, int8=True)
    item = next(image_items(_frame_files(data), (64, 64)))
    a, b = (r.embed(item.model_input)[0].astype(np.float64) for r in (only_onnx, int8))
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.99  # the graph export measured
    summary = stream(StreamOptions(checkpoint=str(data.trainer), input=str(
        _video(data, tmp_path / "in.avi")), backend="onnx", onnx=str(folder), refresh_every=4,
        clip_int8=True, threads=1))
    assert summary["clip_int8"] is True and summary["frames"] == 4
    for opts, said in (({"backend": "torch"}, "use --backend onnx"),
                       ({"backend": "onnx"}, "needs --onnx DIR")):
        with pytest.raises(BadInputError, match=f"--clip-int8: .*{said}"):
            stream(StreamOptions(checkpoint=str(data.trainer), input=str(tmp_path / "in.avi"),
                                 clip_int8=True, **opts))
    assert summary["clip_frames"] == 1


def test_onnx_backend_exports_once_into_its_cache(data: InferenceData, tmp_path: Path,
                                                  monkeypatch, tmp_path_factory):
    """Without --onnx the checkpoint is exported into the cache; a second run reuses it (the
    export itself - tested in test_export - is the session's, copied)."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(stream_module, "EXPORT_CACHE", cache)
    calls = []

    def counted(opts):
        calls.append(opts)
        shutil.copytree(onnx_export(tmp_path_factory), opts.out)
    monkeypatch.setattr(stream_module, "export", counted)
    video = str(_video(data, tmp_path / "in.avi"))
    for _ in range(2):
        summary = stream(StreamOptions(checkpoint=str(data.trainer), input=video,
                                       backend="onnx", limit=2))
        assert summary["frames"] == 2 and summary["out"] is None
    assert len(calls) == 1
    assert [p.name[-6:] for p in cache.iterdir()] == ["-64x64"]


def test_folder_and_mjpeg_on_standard_input(data: InferenceData, tmp_path: Path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    for file in _frame_files(data):
        (folder / file.name).write_bytes(file.read_bytes())
    summary = stream(StreamOptions(checkpoint=str(data.trainer), input=str(folder),
                                   out=str(tmp_path / "f.mp4"), refresh_every=2))
    assert summary["frames"] == 4 and summary["clip_frames"] == 2

    stdin = io.BytesIO(b"".join(f.read_bytes() for f in _frame_files(data)))
    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": stdin})())
    summary = stream(StreamOptions(checkpoint=str(data.trainer), input="-", limit=3,
                                   out=str(tmp_path / "m.mp4")))
    assert summary["frames"] == 3
    assert len(list(iio.imiter(tmp_path / "m.mp4"))) == 3


def test_bad_inputs_one_line_and_no_video(data: InferenceData, tmp_path: Path,
                                          tmp_path_factory, caplog: pytest.LogCaptureFixture):
    video = _video(data, tmp_path / "in.avi", repeat=3)
    short = tmp_path / "short.avi"
    short.write_bytes(video.read_bytes()[: video.stat().st_size * 2 // 3])
    exported = onnx_export(tmp_path_factory)
    out = tmp_path / "o.mp4"
    base = ["--checkpoint", str(data.trainer), "--out", str(out)]
    cases = [
        (["--input", str(tmp_path / "missing.avi")], "no such file or folder"),
        (["--input", "7"], "camera 7: cannot be opened"),
        (["--input", str(video), "--show"], "--show: no window can be opened here"),
        (["--input", str(short)], "--allow-short-video"),
        (["--input", str(video), "--size", "64x40"], "multiples of 32"),
        (["--input", str(video), "--backend", "onnx", "--onnx", str(exported), "--size",
          "96x64"], "graphs for 64x64 frames, not 96x64"),
        (["--input", str(video), "--backend", "onnx", "--onnx", str(tmp_path)],
         "not an export"),
    ]
    for args, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(base + args) == 2, args
        errors = _errors(caplog)
        assert len(errors) == 1 and message in errors[0], (args, errors)
        assert not out.exists() and not Path(str(out) + ".json").exists()

    summary = stream(StreamOptions(checkpoint=str(data.trainer), input=str(short),
                                   allow_short_video=True, out=str(out)))
    assert 0 < summary["frames"] < 12


def test_report_percentiles_and_no_frames():
    report = Report(latency_ms=[10.0, 20.0, 30.0, 40.0], wall_s=0.5, clip_frames=1)
    summary = report.summary()
    assert summary["fps"] == 8.0 and summary["latency_ms"]["p50"] == 25.0
    assert summary["latency_ms"]["max"] == 40.0
    assert Report([], 0.0, 0).summary()["latency_ms"] is None
