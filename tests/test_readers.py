"""Readers of the raw layouts, .mat loading, split files, image decoding and their bad inputs."""

from __future__ import annotations

import io
import logging

import cv2
import h5py
import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.datasets import check_layout, read_frames, readers
from pipeline.datasets.matfile import load_fixdata, write_fixdata
from pipeline.datasets.readers import fixation_points
from pipeline.datasets.spec import Frame
from pipeline.datasets.splits import read_split, write_split
from pipeline.formats.images import decode_gray, decode_reduced_bytes, decode_rgb, jpeg_header
from pipeline.formats.labels import loader_points, matlab_points


def _cell(*points_xy, k=4):
    """An N x k fixdata cell with x in column 3 and y in column 4 (1-based)."""
    cell = np.zeros((len(points_xy), k))
    cell[:, 0] = 1.0
    if points_xy:
        cell[:, 2:4] = np.asarray(points_xy, dtype=float)
    return cell


def _one_line(err: BadInputError, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, (needle, text)


# ---------------------------------------------------------------- .mat files


@pytest.mark.parametrize("mat_format", ["v5", "v7.3"])
def test_fixdata_round_trip_both_formats(tmp_path, mat_format):
    rng = np.random.default_rng(1)
    cells = [rng.random((5, 4)) * 700, np.zeros((0, 0)), rng.random((1, 6)), np.zeros((0, 4)),
             rng.random((30, 4))]
    path = tmp_path / "fixdata1.mat"
    write_fixdata(path, cells, mat_format)
    loaded = load_fixdata(path)
    assert len(loaded) == len(cells)
    for got, want in zip(loaded, cells, strict=True):
        if want.size == 0:
            assert got.size == 0
        else:
            assert got.dtype == np.float64 and np.array_equal(got, want)


def test_v73_layout_is_matlabs(tmp_path):
    """Cells are object references to transposed matrices; empty cells are MATLAB_empty dims."""
    path = tmp_path / "fixdata1.mat"
    write_fixdata(path, [_cell((10.5, 20.5), (30, 40)), np.zeros((0, 0))], "v7.3")
    assert path.read_bytes()[:10] == b"MATLAB 7.3"
    with h5py.File(path, "r") as f:
        var = f["fixdata"]
        assert var.attrs["MATLAB_class"] == b"cell" and var.shape == (1, 2)
        full, empty = (f[ref] for ref in var[0])
        assert full.shape == (4, 2) and full.attrs["MATLAB_class"] == b"double"
        assert empty.attrs["MATLAB_empty"] == 1 and empty.dtype == np.uint64
        assert empty[()].tolist() == [0, 0]


@pytest.mark.parametrize("mat_format", ["v5", "v7.3"])
def test_write_fixdata_is_deterministic(tmp_path, mat_format):
    cells = [_cell((1.5, 2.5)), np.zeros((0, 0))]
    write_fixdata(tmp_path / "a.mat", cells, mat_format)
    write_fixdata(tmp_path / "b.mat", cells, mat_format)
    assert (tmp_path / "a.mat").read_bytes() == (tmp_path / "b.mat").read_bytes()


@pytest.mark.parametrize("mat_format", ["v5", "v7.3"])
@pytest.mark.parametrize("keep", [0.002, 0.05, 0.5, 0.99])
def test_truncated_mat_is_bad_input(tmp_path, mat_format, keep):
    path = tmp_path / "fixdata3.mat"
    write_fixdata(path, [np.random.default_rng(0).random((40, 4)) for _ in range(20)], mat_format)
    data = path.read_bytes()
    path.write_bytes(data[: max(2, int(len(data) * keep))])  # 0.002: inside the header
    with pytest.raises(BadInputError) as info:
        load_fixdata(path)
    _one_line(info.value, str(path), "truncated")


def test_mat_without_fixdata_cell_is_bad_input(tmp_path):
    import scipy.io

    scipy.io.savemat(tmp_path / "other.mat", {"gaze": np.zeros((3, 4))})
    scipy.io.savemat(tmp_path / "matrix.mat", {"fixdata": np.zeros((3, 4))})
    (tmp_path / "text.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(BadInputError, match="no 'fixdata' variable"):
        load_fixdata(tmp_path / "other.mat")
    with pytest.raises(BadInputError, match="not a cell array"):
        load_fixdata(tmp_path / "matrix.mat")
    with pytest.raises(BadInputError, match="not a MATLAB"):
        load_fixdata(tmp_path / "text.mat")
    with pytest.raises(BadInputError, match="missing fixdata file"):
        load_fixdata(tmp_path / "absent.mat")


# ---------------------------------------------------------------- fixation points


def test_fixation_points_are_kept_as_recorded_and_each_consumer_picks_its_own():
    cell = _cell(
        (100.9, 50.2),    # columns 4 = row, 3 = col
        (1279.99, 719.5),  # last pixel
        (1280.0, 10.0),   # col 1280: the loader drops it, the MATLAB loop keeps it (1-based)
        (10.0, 720.0),    # row 720: likewise
        (-0.7, -0.2),     # int() truncates toward zero: the loader keeps it at (0, 0)
        (-1.0, 5.0),      # col -1: neither marks it
        (100.9, 50.2),    # duplicate kept (labels dedupe)
        (1281.0, 3.0),    # past column 1280: neither
        k=5,
    )
    points, outside = fixation_points(cell)
    assert points.dtype == np.float64 and not points.flags.writeable
    np.testing.assert_array_equal(points, cell[:, [3, 2]])          # every point, as recorded
    assert outside == 2
    assert loader_points(points).tolist() == [[50, 100], [719, 1279], [0, 0], [50, 100]]
    assert matlab_points(points).tolist() == [[49, 99], [718, 1278], [9, 1279], [719, 9],
                                              [49, 99]]


def test_fixation_points_empty_and_bad_cells():
    points, dropped = fixation_points(np.zeros((0, 0)))
    assert points.shape == (0, 2) and dropped == 0
    with pytest.raises(ValueError, match="NaN"):
        fixation_points(_cell((1.0, np.nan)))
    with pytest.raises(ValueError, match="at least 4 columns"):
        fixation_points(np.ones((2, 3)))


# ---------------------------------------------------------------- TrafficGaze / DrFixD-rainy


@pytest.mark.parametrize("dataset", ["trafficgaze", "drfixd-rainy"])
@pytest.mark.parametrize("mat_format", ["v5", "v7.3"])
def test_fixdata_frames(tiny_raw, dataset, mat_format):
    cells = {
        1: [_cell((640.5, 360.5), (641, 361), (2000, 5)), np.zeros((0, 0)), _cell((1, 1))],
        2: [_cell((10, 20)), _cell((30, 40), (50, 60))],
    }
    root = tiny_raw(dataset, cells, splits={"train": [1], "test": [2]}, mat_format=mat_format)
    train = list(read_frames(dataset, root, "train"))
    assert [f.name for f in train] == ["01/000001.jpg", "01/000002.jpg", "01/000003.jpg"]
    first = train[0]
    assert isinstance(first, Frame)
    assert (first.dataset, first.split, first.video, first.frame) == (dataset, "train", 1, 1)
    assert first.image_path == root / "trafficframe" / "01" / "000001.jpg"
    assert first.gaze_map_path is None and first.source_size == (720, 1280)
    assert first.fixations.tolist() == [[360.5, 640.5], [361, 641], [5, 2000]]
    assert train[1].fixations.shape == (0, 2)
    assert train[2].fixations.tolist() == [[1, 1]]
    test = list(read_frames(dataset, root, "test"))
    assert [(f.video, f.frame, f.fixations.tolist()) for f in test] == [
        (2, 1, [[20, 10]]), (2, 2, [[40, 30], [60, 50]])]
    assert list(read_frames(dataset, root, "valid")) == []


def test_fixdata_loaded_once_per_file_and_drops_logged(tiny_raw, monkeypatch, caplog):
    root = tiny_raw("trafficgaze", {1: [_cell((5, 5), (1300, 5), (5, -3))] * 6})
    calls = []
    original = readers.load_fixdata
    monkeypatch.setattr(readers, "load_fixdata", lambda path: calls.append(path) or original(path))
    with caplog.at_level(logging.INFO, logger="pipeline.datasets.readers"):
        frames = list(read_frames("trafficgaze", root, "train"))
    assert len(frames) == 6 and len(calls) == 1
    drops = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
    assert len(drops) == 1 and "fixdata1.mat: 6 cells, 18 fixations, 12 outside" in drops[0]


# ---------------------------------------------------------------- BDDA


def test_bdda_frames(tiny_raw):
    root = tiny_raw("bdda", frames={6: 3, 1737: 2}, splits={"test": [6], "valid": [1737]})
    test = list(read_frames("bdda", root, "test"))
    assert [f.name for f in test] == ["0006/0001.jpg", "0006/0002.jpg", "0006/0003.jpg"]
    frame = test[1]
    assert (frame.dataset, frame.split, frame.video, frame.frame) == ("bdda", "test", 6, 2)
    assert frame.image_path == root / "camera_frames" / "0006" / "0002.jpg"
    assert frame.gaze_map_path == root / "gazemap_frames" / "0006" / "0002.jpg"
    assert frame.fixations.shape == (0, 2) and frame.fixations.dtype == np.float64
    assert [f.video for f in read_frames("bdda", root, "valid")] == [1737, 1737]


def test_bdda_count_mismatch_skips_the_whole_video(tiny_raw):
    root = tiny_raw("bdda", frames={6: 3, 9: 2}, splits={"test": [6, 9]})
    (root / "gazemap_frames" / "0006" / "0004.jpg").write_bytes(
        (root / "gazemap_frames" / "0006" / "0003.jpg").read_bytes())
    with pytest.raises(BadInputError) as info:
        list(read_frames("bdda", root, "test"))
    _one_line(info.value, "gazemap_frames/0006", "4 gaze maps but camera_frames/0006 has 3 frames",
              "0004.jpg is only in gazemap_frames/0006")
    bad = []
    frames = list(read_frames("bdda", root, "test", on_bad=bad.append))
    assert [f.name for f in frames] == ["0009/0001.jpg", "0009/0002.jpg"]
    assert len(bad) == 3 and all(err is bad[0] for err in bad)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("dataset,folder,name", [
    ("trafficgaze", "trafficframe", "01/000002.jpg"),
    ("bdda", "camera_frames", "0001/0002.jpg"),
])
def test_missing_frame_listed_in_split(tiny_raw, dataset, folder, name):
    if dataset == "bdda":
        root = tiny_raw(dataset, frames={1: 3})
    else:
        root = tiny_raw(dataset, {1: [_cell((1, 1))] * 3})
    (root / folder / name).unlink()
    if dataset == "bdda":  # remove the pair, or the video fails the count check first
        (root / "gazemap_frames" / name).unlink()
    with pytest.raises(BadInputError) as info:
        list(read_frames(dataset, root, "train"))
    _one_line(info.value, f"{folder}/{name}", "missing frame listed in train.json")
    bad = []
    names = [f.name for f in read_frames(dataset, root, "train", on_bad=bad.append)]
    assert name not in names and len(names) == 2 and len(bad) == 1


@pytest.mark.parametrize("mat_format", ["v5", "v7.3"])
def test_truncated_fixdata_skips_its_video(tiny_raw, mat_format):
    root = tiny_raw("trafficgaze", {1: [_cell((1, 1))] * 3, 2: [_cell((2, 2))] * 2},
                    splits={"train": [1, 2]}, mat_format=mat_format)
    path = root / "fixdata" / "fixdata1.mat"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BadInputError) as info:
        list(read_frames("trafficgaze", root, "train"))
    _one_line(info.value, "fixdata1.mat", "truncated")
    bad = []
    frames = list(read_frames("trafficgaze", root, "train", on_bad=bad.append))
    assert [f.video for f in frames] == [2, 2] and len(bad) == 3


def test_missing_fixdata_file(tiny_raw):
    root = tiny_raw("trafficgaze", {1: [_cell((1, 1))] * 2})
    (root / "fixdata" / "fixdata1.mat").unlink()
    with pytest.raises(BadInputError) as info:
        next(read_frames("trafficgaze", root, "train"))
    _one_line(info.value, "fixdata1.mat", "missing fixdata file")


def test_fixdata_with_fewer_cells_than_frames(tiny_raw):
    root = tiny_raw("trafficgaze", {1: [_cell((1, 1))] * 2}, frames={1: 4})
    with pytest.raises(BadInputError) as info:
        list(read_frames("trafficgaze", root, "train"))
    _one_line(info.value, "fixdata1.mat", "has 2 cells", "01/000003.jpg needs cell 3")
    bad = []
    assert [f.frame for f in read_frames("trafficgaze", root, "train", on_bad=bad.append)] == [1, 2]
    assert len(bad) == 2


@pytest.mark.parametrize("mat_format", ["v5", "v7.3"])
def test_nan_fixations_are_bad_input(tiny_raw, mat_format):
    root = tiny_raw("trafficgaze", {1: [_cell((1, 1)), _cell((5, np.nan), (3, 3)), _cell((2, 2))]},
                    mat_format=mat_format)
    with pytest.raises(BadInputError) as info:
        list(read_frames("trafficgaze", root, "train"))
    _one_line(info.value, "fixdata1.mat", "cell 2 (01/000002.jpg)", "NaN")
    bad = []
    assert [f.frame for f in read_frames("trafficgaze", root, "train", on_bad=bad.append)] == [1, 3]
    assert len(bad) == 1


def test_cell_with_too_few_columns(tiny_raw):
    root = tiny_raw("trafficgaze", {1: [np.ones((2, 3))]})
    with pytest.raises(BadInputError, match="at least 4 columns"):
        list(read_frames("trafficgaze", root, "train"))


def test_root_that_is_not_the_named_dataset(tiny_raw, tmp_path):
    traffic = tiny_raw("trafficgaze", {1: [_cell((1, 1))]})
    bdda = tiny_raw("bdda", frames={1: 1})
    with pytest.raises(BadInputError) as info:
        list(read_frames("bdda", traffic, "train"))
    _one_line(info.value, str(traffic), "not a BDDA root", "looks like a TrafficGaze root")
    with pytest.raises(BadInputError) as info:
        check_layout("drfixd-rainy", bdda)
    _one_line(info.value, "not a DrFixD-rainy root", "trafficframe/", "looks like a BDDA root")
    with pytest.raises(BadInputError, match="does not exist"):
        check_layout("trafficgaze", tmp_path / "nowhere")
    with pytest.raises(ValueError):
        check_layout("nosuch", traffic)
    with pytest.raises(BadInputError) as info:
        check_layout("dreyeve", traffic)
    _one_line(info.value, "not a DR(eye)VE root", "no dr(eye)ve_design.txt file",
              "looks like a TrafficGaze root")


def test_split_file_problems(tiny_raw):
    root = tiny_raw("trafficgaze", {1: [_cell((1, 1))] * 2})
    (root / "valid.json").unlink()
    with pytest.raises(BadInputError, match=r"valid\.json: missing split file"):
        read_frames("trafficgaze", root, "valid")  # raised on the call, before iterating
    (root / "test.json").write_text('"01/000001.jpg"\n01/000002.jpg\n')
    with pytest.raises(BadInputError, match=r"test\.json: line 2: expected a JSON string"):
        list(read_frames("trafficgaze", root, "test"))
    write_split(root / "test.json", ["0001/0001.jpg"])
    with pytest.raises(BadInputError, match=r"not of the form 'VV/FFFFFF\.jpg'"):
        list(read_frames("trafficgaze", root, "test", on_bad=lambda err: None))
    with pytest.raises(ValueError):
        list(read_frames("trafficgaze", root, "val"))


def test_split_files_read_like_the_released_ones(tmp_path):
    path = tmp_path / "test.json"
    path.write_bytes(b'"04/000006.jpg"\r\n\n"04/000007.jpg"')  # CRLF, blank line, no final newline
    assert read_split(path) == ["04/000006.jpg", "04/000007.jpg"]
    write_split(path, ["01/000006.jpg", "01/000007.jpg"])
    assert path.read_text() == '"01/000006.jpg"\n"01/000007.jpg"\n'


# ---------------------------------------------------------------- image decoding


def test_decoders_match_the_published_loaders(tiny_raw):
    root = tiny_raw("bdda", frames={1: 1})
    camera = root / "camera_frames" / "0001" / "0001.jpg"
    gaze = root / "gazemap_frames" / "0001" / "0001.jpg"
    rgb = decode_rgb(camera)
    assert rgb.dtype == np.uint8 and rgb.shape == (720, 1280, 3)
    assert np.array_equal(rgb, imageio.imread(camera))
    gray = decode_gray(gaze)
    assert gray.dtype == np.uint8 and gray.shape == (576, 1024)
    assert np.array_equal(gray, cv2.imread(str(gaze), cv2.IMREAD_GRAYSCALE))
    assert np.array_equal(decode_gray(camera), cv2.imread(str(camera), cv2.IMREAD_GRAYSCALE))


def _scene(height: int = 181, width: int = 323) -> np.ndarray:
    """A smooth-plus-noise uint8 [h, w, 3] picture with odd dimensions (partial MCUs)."""
    rng = np.random.default_rng(7)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 2)
    ramp = np.linspace(0, 90, width, dtype=np.float32)[None, :, None]
    return np.clip(noise.astype(np.float32) * 1.5 - 60 + ramp, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, mode: str = "RGB", exif_orientation: int | None = None,
          **options) -> bytes:
    image = Image.fromarray(pixels).convert(mode)
    if exif_orientation is not None:
        exif = image.getexif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif.tobytes()
    buf = io.BytesIO()
    image.save(buf, "JPEG", **options)
    return buf.getvalue()


@pytest.mark.parametrize("mode,options", [
    ("RGB", {"quality": 95, "subsampling": 0}),  # 4:4:4
    ("RGB", {"quality": 90, "subsampling": 1}),  # 4:2:2
    ("RGB", {"quality": 75, "subsampling": 2}),  # 4:2:0, as video frame dumps are
    ("RGB", {"quality": 85, "subsampling": 2, "progressive": True}),
    ("RGB", {"quality": 85, "exif_orientation": 6}),  # imageio ignores EXIF rotation
    ("L", {"quality": 90}),
    ("CMYK", {"quality": 90}),  # not OpenCV's: decoded (and converted) by Pillow
])
def test_decode_rgb_is_imageio_on_every_jpeg_flavour(tmp_path, mode, options):
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg(_scene(), mode, **options))
    want = np.asarray(Image.open(path).convert("RGB")) if mode == "CMYK" else imageio.imread(path)
    if want.ndim == 2:
        want = np.repeat(want[:, :, None], 3, axis=2)
    got = decode_rgb(path)
    assert got.dtype == np.uint8 and got.shape == (181, 323, 3)
    assert np.array_equal(got, want)


def test_decode_rgb_of_a_png_frame(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(_scene()).save(path)
    assert np.array_equal(decode_rgb(path), _scene())


@pytest.mark.parametrize("size,scale", [((256, 256), 1), ((64, 64), 2), ((40, 40), 4),
                                        ((20, 20), 8), ((200, 100), 1)])
def test_decode_reduced_is_the_dct_scaled_decode(tmp_path, size, scale):
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg(_scene(), quality=90, subsampling=2))
    for mode in ("RGB", "L"):
        with Image.open(path) as image:
            image.draft(mode, (size[1], size[0]))
            want = np.asarray(image.convert(mode))
        got = decode_reduced_bytes(path.read_bytes(), path, size, mode)
        assert got.shape[:2] == (-(-181 // scale), -(-323 // scale))
        assert np.array_equal(got, want)


def test_jpeg_header():
    data = _jpeg(_scene(), quality=80)
    assert jpeg_header(data) == (3, 181, 323)
    assert jpeg_header(_jpeg(_scene(), "L")) == (1, 181, 323)
    assert jpeg_header(b"\x89PNG\r\n") is None
    assert jpeg_header(data[:20]) is None  # cut before the frame header
    assert jpeg_header(b"\xff\xd8\xff\xda\x00\x02") is None  # scan before any frame header


@pytest.mark.parametrize("decode", [decode_rgb, decode_gray])
@pytest.mark.parametrize("damage,problem", [
    (lambda data: data[: len(data) // 2], "truncated JPEG"),
    (lambda data: data[:-2], "truncated JPEG"),
    (lambda data: b"GIF89a" + bytes(200), "corrupt image"),
    (lambda data: data[:2] + bytes(len(data) - 4) + data[-2:], "corrupt image"),
    (lambda data: b"", "empty image file"),
])
def test_bad_images(tiny_raw, decode, damage, problem):
    root = tiny_raw("bdda", frames={1: 1})
    path = root / "camera_frames" / "0001" / "0001.jpg"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(BadInputError) as info:
        decode(path)
    _one_line(info.value, str(path), problem)


@pytest.mark.parametrize("decode", [decode_rgb, decode_gray])
def test_missing_image(tmp_path, decode):
    with pytest.raises(BadInputError, match="missing image file"):
        decode(tmp_path / "0001.jpg")
