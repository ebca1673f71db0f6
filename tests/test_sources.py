"""Frame sources of predict and stream (:mod:`salmm.data.sources`), the live-source stage
(:class:`pipeline.core.pipes.Latest`), the background consumer
(:class:`~pipeline.core.pipes.Sink`) and the streaming MP4 writer
(:class:`salmm.render.overlay.VideoWriter`)."""

from __future__ import annotations

import io
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.core.pipes import Latest, Sink
from salmm.data.sources import mjpeg_items, split_mjpeg
from salmm.render import overlay
from tests.test_bad_input import corrupt_scan, refused


def jpeg(seed: int, size=(48, 64), **save) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.kron(coarse, np.ones((8, 8, 1), np.uint8))).save(out, "JPEG", **save)
    return out.getvalue()


def with_thumbnail(data: bytes, thumbnail: bytes) -> bytes:
    """``data`` with an APP1 segment right after its SOI that holds a whole JPEG (EXIF
    thumbnails are stored so), EOI marker included."""
    payload = b"Exif\x00\x00" + thumbnail
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


class Trickle(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes a read (a pipe, a socket)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.step if n < 0 else min(n, self.step)
        block = self.data[self.at:self.at + n]
        self.at += len(block)
        return block


# ---- MJPEG ---------------------------------------------------------------------------------------


def test_split_mjpeg_returns_each_image_exactly_whatever_the_reads():
    images = [jpeg(0), jpeg(1, progressive=True), with_thumbnail(jpeg(2), jpeg(3, (16, 16))),
              jpeg(4, (720 // 8 * 8, 1280), quality=95), jpeg(5, restart_marker_blocks=1)]
    stream = b"--frame\r\nContent-Type: image/jpeg\r\n\r\n".join(images) + b"\r\n"
    assert list(split_mjpeg(io.BytesIO(stream))) == images
    assert list(split_mjpeg(Trickle(stream, 7))) == images
    assert list(split_mjpeg(Trickle(b"".join(images), 1))) == images
    # the thumbnail's end marker does not end the image around it
    assert images[2].count(b"\xff\xd9") == 2


def test_mjpeg_items_decode_and_resize():
    images = [jpeg(i, (64, 96)) for i in range(3)]
    items = list(mjpeg_items(io.BytesIO(b"".join(images)), (32, 64)))
    assert [it.name for it in items] == ["frame_000001", "frame_000002", "frame_000003"]
    assert items[0].frame.shape == (64, 96, 3) and items[0].model_input.shape == (32, 64, 3)
    want = np.asarray(Image.open(io.BytesIO(images[1])).convert("RGB"))
    assert np.abs(items[1].frame.astype(int) - want).max() <= 1


def test_broken_mjpeg_streams_are_refused_naming_the_image():
    good = jpeg(0)
    refused(lambda: list(split_mjpeg(io.BytesIO(good + good[:-300]))),
            "stdin image 2", "ended inside the image")
    refused(lambda: list(mjpeg_items(io.BytesIO(b""), (32, 32))), "stdin", "no JPEG image")
    refused(lambda: list(mjpeg_items(io.BytesIO(b"no images here" * 10), (32, 32))),
            "no JPEG image")
    refused(lambda: list(mjpeg_items(io.BytesIO(good + corrupt_scan(jpeg(1, (256, 256)))),
                                     (32, 32))), "stdin image 2", "corrupt JPEG")
    header_damaged = good[:2] + b"\x00\x11" + good[4:]
    refused(lambda: list(split_mjpeg(io.BytesIO(header_damaged))), "stdin image 1",
            "no marker at byte 2")


# ---- live sources --------------------------------------------------------------------------------


def test_latest_hands_out_the_newest_item_and_counts_the_rest():
    produced = 200

    def source():
        for i in range(produced):
            time.sleep(0.0005)
            yield i

    live = Latest(source())
    seen = []
    for item in live:
        seen.append(item)
        time.sleep(0.004)                          # a consumer slower than the source
    assert seen == sorted(set(seen))               # in order, none twice
    assert seen[-1] == produced - 1                # the last item is never dropped
    assert len(seen) + live.dropped == produced
    assert live.dropped > 0


def test_latest_reraises_the_sources_error_after_its_items():
    def source():
        yield from range(3)
        raise BadInputError("camera 0", "gone")

    seen = []
    with pytest.raises(BadInputError, match="gone"):
        for item in Latest(source()):
            seen.append(item)
            time.sleep(0.01)
    assert seen and seen[-1] == 2


def test_leaving_a_latest_loop_stops_its_thread():
    def source():
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(0.001)

    before = threading.active_count()
    for item in Latest(source()):
        if item > 5:
            break
    assert threading.active_count() == before


def test_a_sink_consumes_in_order_in_its_thread_and_waits_at_the_end():
    consumed, threads = [], set()

    def consume(item):
        time.sleep(0.002)
        threads.add(threading.current_thread().name)
        consumed.append(item)

    before = threading.active_count()
    with Sink(consume, depth=1) as sink:
        for i in range(20):
            sink.put(i)
    assert consumed == list(range(20)) and threads == {"sink"}
    assert threading.active_count() == before


def test_a_sinks_failure_reraises_and_stops_consuming():
    consumed = []

    def consume(item):
        if item == 3:
            raise ValueError("disk full")
        consumed.append(item)

    with pytest.raises(ValueError, match="disk full"), Sink(consume, depth=2) as sink:
        for i in range(10):
            sink.put(i)
    assert consumed == [0, 1, 2]
    # the producer's own failure wins; what was put before is still consumed
    consumed.clear()
    with pytest.raises(KeyboardInterrupt), Sink(consumed.append, depth=4) as sink:
        sink.put(1)
        sink.put(2)
        raise KeyboardInterrupt
    assert consumed == [1, 2]


# ---- the streaming writer ------------------------------------------------------------------------


def test_video_writer_streams_frames_atomically(tmp_path):
    path = tmp_path / "v.mp4"
    frames = [np.full((50, 70, 3), 20 * i, np.uint8) for i in range(6)]
    with overlay.VideoWriter(path, fps=12) as video:
        for i, frame in enumerate(frames):
            video.write(frame)
            if i == 2:
                assert not path.exists()           # only under a temporary name so far
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
    ok, first = capture.read()
    capture.release()
    assert count == 6 and size == (64, 80) and ok          # padded to multiples of 16
    assert abs(int(first[:50, :70].mean()) - 0) <= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_video_writer_leaves_nothing_when_abandoned(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError), overlay.VideoWriter(path, fps=5) as video:
        video.write(np.zeros((32, 32, 3), np.uint8))
        raise RuntimeError("the source failed")
    with pytest.raises(ValueError, match="differ in size"), overlay.VideoWriter(path, fps=5) as video:
        video.write(np.zeros((32, 32, 3), np.uint8))
        video.write(np.zeros((48, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"), overlay.VideoWriter(path, fps=5):
        pass
    assert list(tmp_path.iterdir()) == []
