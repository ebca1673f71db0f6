"""``python -m salmm.predict`` and the pictures it draws (:mod:`salmm.render.overlay`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import pytest

from pipeline.core.errors import BadInputError
from salmm.deploy.options import PredictOptions
from salmm.deploy.pictures import ANIMATION_WIDTH, predict
from salmm.predict import main
from salmm.render import overlay
from tests._inference_data import InferenceData, inference_data


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


def png_shape(path: Path) -> tuple[int, ...]:
    return cv2.imread(str(path)).shape


def gif_frames(path: Path) -> int:
    return iio.imread(path, index=None).shape[0]


def mp4_frames(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(frame count, frames per second, (height, width)) of an MP4 as OpenCV reads it."""
    capture = cv2.VideoCapture(str(path))
    try:
        return (int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS),
                (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                 int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))))
    finally:
        capture.release()


# ---- overlay -----------------------------------------------------------------------------------


def test_overlay_blends_by_saliency():
    frame = np.full((20, 30, 3), 100, np.uint8)
    saliency = np.zeros((10, 15))
    saliency[5, 7] = 1.0
    out = overlay.overlay(frame, saliency, alpha=0.5)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.array_equal(out[0, 0], frame[0, 0])            # zero saliency: frame unchanged
    peak = np.unravel_index(np.abs(out.astype(int) - 100).sum(-1).argmax(), out.shape[:2])
    assert abs(peak[0] - 10) <= 2 and abs(peak[1] - 14) <= 2
    # a constant map has nothing salient: the frame shows through
    assert np.array_equal(overlay.overlay(frame, np.ones((4, 4))), frame)


def test_overlay_is_the_float32_blend_to_the_bit():
    """The one-pass blend against the numpy expression it replaces, written out here: random
    frames (odd sizes, a non-contiguous one), maps and alphas."""
    rng = np.random.default_rng(0)
    for trial in range(12):
        h, w = (int(v) for v in rng.integers(5, 300, 2))
        frame = rng.integers(0, 256, (h, w + 1, 3), dtype=np.uint8)[:, 1:]  # not contiguous
        saliency, alpha = rng.random((31, 17)), float(rng.random())
        s = overlay._fit(saliency, (h, w))
        weight = (alpha * s)[..., None]
        mixed = (frame.astype(np.float32) * (1 - weight)
                 + overlay.colorize(s, "jet").astype(np.float32) * weight)
        want = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
        assert np.array_equal(overlay.overlay(frame, saliency, colormap="jet", alpha=alpha),
                              want), trial
        transposed = np.ascontiguousarray(frame.transpose(1, 0, 2)).transpose(1, 0, 2)
        assert np.array_equal(overlay.overlay(transposed, saliency, colormap="jet",
                                              alpha=alpha), want), trial     # other layouts


def test_colour_levels_are_the_numpy_expression_to_the_bit():
    """The one-pass levels against min-max scaling, * 255 and rounding half to even in numpy,
    written out here: maps whose levels fall exactly on halves, tiny and huge ranges, float64
    input, a constant map; NaN and inf refused."""
    rng = np.random.default_rng(0)
    maps = [np.linspace(0, 1, 511, dtype=np.float32).reshape(7, 73),      # 0.5, 2.5, ... exactly
            rng.random((36, 64)).astype(np.float32), rng.random((31, 17)),
            (rng.random((20, 20)) * 1e-6 + 0.5).astype(np.float32),
            rng.standard_normal((16, 16)) * 1e30]
    for m in maps:
        m32 = m.astype(np.float32)
        low, high = float(m32.min()), float(m32.max())
        want = np.round((m32 - low) / (high - low) * 255).astype(np.uint8)
        assert np.array_equal(overlay.levels(m), want), m.shape
    assert not overlay.levels(np.full((3, 4), 2.0)).any()
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or inf"):
            overlay.levels(np.array([[0.0, bad]]))


@pytest.mark.parametrize("colormap", sorted(overlay.COLORMAPS))
def test_heat_maps_are_opencvs_colour_maps_to_the_bit(colormap: str):
    """Each level's colour looked up against OpenCV's applyColorMap on the whole map."""
    m = np.random.default_rng(0).random((37, 53))
    want = cv2.cvtColor(cv2.applyColorMap(overlay.levels(m), overlay.COLORMAPS[colormap]),
                        cv2.COLOR_BGR2RGB)
    assert np.array_equal(overlay.colorize(m, colormap), want)


def test_colorize_and_side_by_side():
    heat = overlay.colorize(np.linspace(0, 1, 64).reshape(8, 8), "jet")
    assert heat.shape == (8, 8, 3)
    assert heat[0, 0, 2] > heat[0, 0, 0] and heat[-1, -1, 0] > heat[-1, -1, 2]   # blue -> red
    panels = [np.zeros((8, 5, 3), np.uint8)] * 3
    assert overlay.side_by_side(panels, gap=2).shape == (8, 19, 3)
    with pytest.raises(ValueError, match="differ in height"):
        overlay.side_by_side([np.zeros((8, 5, 3), np.uint8), np.zeros((9, 5, 3), np.uint8)])


def test_gif_has_one_frame_per_picture_and_mp4_falls_back(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture):
    frames = [np.full((12, 16, 3), 40 * i, np.uint8) for i in range(5)]
    assert overlay.write_animation(tmp_path / "a.gif", frames, fps=4) == 5
    assert gif_frames(tmp_path / "a.gif") == 5
    assert iio.immeta(tmp_path / "a.gif")["duration"] == 250
    monkeypatch.setattr(overlay, "mp4_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="salmm.render.overlay"):
        assert overlay.animation_format("auto") == "gif"
        assert overlay.animation_format("mp4") == "gif"
    assert "no ffmpeg backend" in caplog.text
    assert overlay.animation_format("none") is None
    assert [p.name for p in tmp_path.iterdir()] == ["a.gif"]     # no temporary files left


def test_mp4_frames_are_padded_to_macro_blocks(tmp_path: Path):
    image = np.random.default_rng(0).integers(0, 256, (49, 81, 3), dtype=np.uint8)
    padded = overlay._pad_to_blocks(image)
    assert padded.shape == (64, 96, 3)
    assert np.array_equal(padded[:49, :81], image) and np.all(padded[49:] == 255)
    assert overlay.mp4_available()                   # imageio-ffmpeg is a dependency
    assert overlay.write_animation(tmp_path / "a.mp4", [image, 255 - image], fps=2) == 2
    capture = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 2


def _banner(width: int) -> int:
    """Rows of the banner a picture made with random CLIP weights gets."""
    return overlay.banner(np.zeros((1, width, 3), np.uint8),
                          "RANDOM CLIP WEIGHTS: a smoke run, not real results").shape[0] - 1


def test_a_flat_prediction_is_drawn_on_its_own_scale():
    """Values from the map's median (no colour) to its max (full colour): a prediction in
    [0.49, 0.51] shows as clearly as a label in [0, 1]; the scale strip draws the colour map
    between those two values."""
    flat = 0.49 + 0.02 * np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    low, high = overlay.display_range(flat)
    assert low == pytest.approx(float(np.median(flat))) and high == pytest.approx(0.51)
    s = overlay.stretch(flat, (low, high))
    assert s.min() == 0.0 and s.max() == 1.0 and (s == 0).sum() >= 64 * 64 // 2
    frame = np.full((64, 64, 3), 100, np.uint8)
    drawn = overlay.overlay(frame, flat, alpha=0.5, value_range=(low, high))
    heat = overlay.colorize(s)
    want = np.rint(frame * (1 - 0.5 * s[..., None]) + heat * (0.5 * s[..., None]))
    assert np.abs(drawn.astype(float) - want).max() <= 1
    assert overlay.display_range(np.full((4, 4), 0.3)) == (pytest.approx(0.3), pytest.approx(0.3))
    strip = overlay.scale_strip(300, (low, high))
    assert strip.shape[1] == 300 and strip.shape[0] < 40
    row = strip[strip.shape[0] // 2]
    bar = row[(row != 255).any(axis=1)]
    ends = overlay.colorize(np.array([[0.0, 1.0]], np.float32))[0]
    assert any(np.abs(bar.astype(int) - ends[0]).max(axis=1) <= 2)
    assert any(np.abs(bar.astype(int) - ends[1]).max(axis=1) <= 2)


def test_stamps_change_only_their_corner():
    image = np.full((120, 400, 3), 90, np.uint8)
    for corner in ("top-left", "top-right", "bottom-left", "bottom-right"):
        out = overlay.stamp(image, "12.3 fps, 45 ms", corner=corner)
        changed = np.argwhere((out != image).any(axis=2))
        rows, cols = changed[:, 0], changed[:, 1]
        assert len(changed) and rows.max() - rows.min() < 40
        assert (rows.max() < 60) == corner.startswith("top")
        assert (cols.max() < 200) == corner.endswith("left")


def test_caveats_name_synthetic_data_and_random_clip():
    from types import SimpleNamespace

    from salmm.deploy.pictures import caveat_of

    def made(synthetic, pretrained):
        return caveat_of(SimpleNamespace(data=SimpleNamespace(synthetic=synthetic)),
                         SimpleNamespace(clip=SimpleNamespace(pretrained=pretrained)))
    assert made(True, None) == ("SYNTHETIC DATA / RANDOM CLIP WEIGHTS: a smoke run, not real"
                                " results")
    assert made(False, "openai") == ""
    assert made(True, "openai").startswith("SYNTHETIC DATA:")


# ---- predict -----------------------------------------------------------------------------------


def test_panels_carry_their_captions():
    panel = np.full((64, 64, 3), 90, np.uint8)
    picture = overlay.side_by_side([panel, panel, panel], titles=("frame", "prediction",
                                                                   "ground truth"))
    strip = picture.shape[0] - 64
    assert strip > 0 and picture.shape == (64 + strip, 3 * 64 + 2 * 4, 3)
    assert np.array_equal(picture[strip:, :64], panel)           # the panel itself, untouched
    for left in (0, 68, 136):                                    # some dark text in each strip
        assert (picture[:strip, left:left + 64] < 128).any()
    with pytest.raises(ValueError, match="2 titles for 3 panels"):
        overlay.side_by_side([panel] * 3, titles=("a", "b"))


def test_prepared_split_side_by_side_with_ground_truth(data: InferenceData, tmp_path: Path):
    out = tmp_path / "out"
    written = predict(PredictOptions(checkpoint=str(data.trainer), input=str(data.prepared),
                                     out=str(out), cached_clip=True, limit=3))
    keys = [s["key"] for s in data.test_samples()][:3]
    assert [p.name for p in written] == [f"{k}.png" for k in keys] + ["animation.mp4"]
    for key in keys:
        height, width, _ = png_shape(out / f"{key}.png")
        assert height > 64 and width == 3 * 64 + 2 * 4               # captions above the panels
    assert mp4_frames(out / "animation.mp4")[0] == 3


def test_raw_frames_overlaid_at_their_resolution(data: InferenceData, tmp_path: Path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for number in (6, 7, 8):
        shutil.copy(data.raw / "trafficframe" / "03" / f"{number:06d}.jpg", frames)
    out = tmp_path / "out"
    written = predict(PredictOptions(checkpoint=str(data.trainer), input=str(frames),
                                     out=str(out), fps=5, animation="gif"))
    assert [p.name for p in written] == ["000006.png", "000007.png", "000008.png",
                                         "animation.gif"]
    source = cv2.imread(str(frames / "000006.jpg")).shape
    assert source == (720, 1280, 3)
    strip = overlay.scale_strip(1280, (0.0, 1.0)).shape[0]     # the colour scale under it
    banner = _banner(1280)                                       # random CLIP weights, said
    for p in written[:3]:
        assert png_shape(p) == (banner + 720 + strip, 1280, 3)
    animation = iio.imread(out / "animation.gif", index=None)
    assert animation.shape == (3, round((banner + 720 + strip) * ANIMATION_WIDTH / 1280),
                               ANIMATION_WIDTH, 3)


def test_video_and_single_frame(data: InferenceData, tmp_path: Path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (96, 64))
    for number in range(6, 10):
        image = cv2.imread(str(data.raw / "trafficframe" / "03" / f"{number:06d}.jpg"))
        writer.write(cv2.resize(image, (96, 64), interpolation=cv2.INTER_AREA))
    writer.release()
    written = predict(PredictOptions(checkpoint=str(data.trainer), input=str(video),
                                     out=str(tmp_path / "video"), limit=3))
    assert [p.name for p in written] == ["frame_000001.png", "frame_000002.png",
                                         "frame_000003.png", "animation.mp4"]
    height = _banner(96) + 64 + overlay.scale_strip(96, (0.0, 1.0)).shape[0]
    assert png_shape(written[0]) == (height, 96, 3)
    count, fps, size = mp4_frames(written[-1])
    assert count == 3 and fps == pytest.approx(5)                     # the video's 5 fps
    assert size == (-(-height // 16) * 16, 96)                        # padded to macro blocks
    single = predict(PredictOptions(checkpoint=str(data.trainer), input=str(written[0]),
                                    out=str(tmp_path / "single")))
    assert [p.name for p in single] == ["frame_000001.png"]      # one frame: no animation


def test_official_checkpoint_from_the_command_line(data: InferenceData, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(["--checkpoint", str(data.official), "--input", str(data.prepared),
                     "--out", str(out), "--cached-clip", "--clip-pretrained", "none",
                     "--limit", "2", "--colormap", "inferno"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s['key']}.png" for s in data.test_samples()[:2]] + ["animation.mp4"])
    assert "RANDOM weights" in caplog.text


# ---- refusals ----------------------------------------------------------------------------------


def refused(data: InferenceData, tmp_path: Path, **changes) -> str:
    opts = PredictOptions(**{"checkpoint": str(data.trainer), "input": str(data.prepared),
                             "out": str(tmp_path / "out"), **changes})
    with pytest.raises(BadInputError) as info:
        predict(opts)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_bad_inputs_are_refused_in_one_line(data: InferenceData, tmp_path: Path):
    missing = tmp_path / "missing.mp4"
    assert refused(data, tmp_path, input=str(missing)) == f"{missing}: no such file or folder"
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"not a video" * 100)
    assert refused(data, tmp_path, input=str(garbage)).startswith(
        f"{garbage}: cannot be read as a video")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused(data, tmp_path, input=str(empty)).startswith(f"{empty}: no frames here")
    assert refused(data, tmp_path, input=str(garbage.parent / "empty"), cached_clip=True,
                   ).startswith(f"{empty}: --cached-clip needs a prepared dataset")
    nockpt = tmp_path / "none.pt"
    assert refused(data, tmp_path, checkpoint=str(nockpt)).startswith(
        f"{nockpt}: no such checkpoint: give")
    assert refused(data, tmp_path, split="bogus").startswith(
        f"{data.prepared}/manifest.json: no split 'bogus'")


def test_command_exit_code_and_one_line(data: InferenceData, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture):
    missing = tmp_path / "missing"
    with caplog.at_level(logging.ERROR, logger="salmm.predict"):
        code = main(["--checkpoint", str(data.trainer), "--input", str(missing), "--out",
                     str(tmp_path / "out")])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"{missing}: no such file or folder"]


def test_pictures_wider_than_the_limit_are_shrunk_keeping_the_aspect():
    wide = np.zeros((1000, 2000, 3), np.uint8)
    wide[:, 1000:] = 200
    small = overlay.at_most_wide(wide, 768)
    assert small.shape == (384, 768, 3)
    assert small[:, :380].max() == 0 and small[:, 388:].min() == 200    # halves stay halves
    narrow = np.zeros((10, 500, 3), np.uint8)
    assert overlay.at_most_wide(narrow, 768) is narrow


def test_stream_frames_are_binned_by_a_whole_factor_into_block_means():
    frame = np.random.default_rng(0).integers(0, 256, (72, 132, 3), dtype=np.uint8)
    assert overlay.binned_to_width(frame, 132) is frame
    for width, factor in ((131, 2), (66, 2), (65, 3), (44, 3), (40, 4)):
        binned = overlay.binned_to_width(frame, width)
        assert binned.shape == (72 // factor, 132 // factor, 3)
        blocks = frame.reshape(72 // factor, factor, 132 // factor, factor, 3)
        means = blocks.astype(np.float64).mean(axis=(1, 3))       # each pixel an f x f block
        assert np.abs(binned - means).max() <= 0.5 + 1e-9, width
    odd = overlay.binned_to_width(frame[:71, :131], 65)               # no whole blocks: 3
    assert odd.shape == (24, 44, 3) and odd.shape[1] <= 65
