"""Frames of a video file, by index, decoded exactly and refused in one line when they cannot be.

DR(eye)VE and DADA-2000 ship their camera frames and their gaze maps as videos. A
:class:`VideoFile` opens one with OpenCV's FFmpeg backend and hands out frame ``i`` (0-based, in
decoding order) as BGR ``uint8 [H, W, 3]``:

* reading forward is sequential (``grab`` skips frames without converting them), so a task
  that takes every fifth frame of a sequence decodes each frame once;
* a frame behind the last one read, or far ahead of it, is reached by a seek and the position
  the backend reports afterwards is checked, so a frame is never silently another one;
* a frame the file does not hold (``index`` at or past the frame count its container announces,
  or a file that ends early or is damaged there) raises :class:`~pipeline.core.errors.BadInputError`
  naming the file and the frame;
* **damaged data is refused, not concealed.** FFmpeg's decoders repair damaged data by
  inventing pixels and say so only in their log, which OpenCV prints to the process's stderr.
  So every read runs with file descriptor 2 caught (:func:`_ffmpeg_messages`) and one decoding
  thread (messages then belong to the frame being decoded): a frame whose decoding - or the
  decoding of the frames skipped on the way to it - logged an FFmpeg error is refused with
  FFmpeg's words. The capture is then reopened; a later frame whose decoding passes through
  the damaged data again is refused too (those that depend on it, and, as OpenCV's seek starts
  decoding from the keyframe before a point up to 16 frames early, a second or so after it).
  Other output caught on stderr meanwhile is written back. File descriptor 2 belongs to the
  whole process, so reads are serialised by a lock: a Dask worker with several threads decodes
  one frame at a time (the local cluster runs one thread a worker process).

:func:`open_video` keeps the last few files of a process open (a Dask worker decodes shard after
shard of the same sequence). :func:`video_info` reads a container's header only: frame count,
size and rate, without decoding.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import BadInputError

SEEK_AHEAD = 64
"""Frames ahead of the last one read beyond which a seek is cheaper than decoding forward."""
OPEN_FILES = 4
"""Video files a process keeps open (:func:`open_video`)."""
MAX_FRAMES = 1_000_000
"""Most frames a header may announce (11 hours at 25 fps): a damaged header claiming billions
would otherwise have a split listed frame by frame into memory."""


@dataclass(frozen=True)
class VideoInfo:
    """A video's header: ``frames`` (the count the container announces), ``size`` (height, width)
    in pixels and ``fps`` (frames per second; 0 when the container does not say)."""

    frames: int
    size: tuple[int, int]
    fps: float


_STDERR = threading.Lock()
"""Held while file descriptor 2 is redirected (it is the process's, not a thread's)."""
_FFMPEG_LINE = re.compile(rb"^\[[\w:-]+ @ (0x)?[0-9a-fA-F]+\] (.*)$", re.MULTILINE)


@contextmanager
def _ffmpeg_messages() -> Iterator[list[str]]:
    """The FFmpeg log lines printed to file descriptor 2 during the block (filled in at its end,
    without FFmpeg's ``[codec @ address]`` prefix); anything else printed there is written back."""
    found: list[str] = []
    sys.stderr.flush()
    with _STDERR, tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield found
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read()
            found += [m.group(2).decode(errors="replace").strip()
                      for m in _FFMPEG_LINE.finditer(text)]
            rest = _FFMPEG_LINE.sub(b"", text).strip()
            if rest:
                os.write(2, rest + b"\n")


def _capture(path: Path) -> cv2.VideoCapture:
    if not path.is_file():
        raise BadInputError(path, "missing video" if not path.exists() else "not a file")
    with _ffmpeg_messages():        # opening a damaged file logs too; isOpened() says enough
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not capture.isOpened():
        raise BadInputError(path, "cannot be read as a video (corrupt, or not a video)")
    return capture


def _info(capture: cv2.VideoCapture, path: Path) -> VideoInfo:
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
    if frames <= 0 or min(size) <= 0:
        raise BadInputError(path, "the video's header announces no frames (corrupt, or not a"
                            " video)")
    if frames > MAX_FRAMES:
        raise BadInputError(path, f"the video's header announces {frames} frames, more than the"
                            f" {MAX_FRAMES} salmm reads from one video (a damaged header?)")
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    return VideoInfo(frames, size, fps if fps > 0 else 0.0)


def video_info(path: str | os.PathLike[str]) -> VideoInfo:
    """The header of the video at ``path`` (nothing decoded); BadInputError naming the file when it
    is missing or cannot be opened as a video."""
    path = Path(path)
    capture = _capture(path)
    try:
        return _info(capture, path)
    finally:
        capture.release()


class VideoFile:
    """One open video: ``read(i)`` gives frame ``i`` (0-based) as BGR ``uint8 [H, W, 3]``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._capture = _capture(self.path)
        self.info = _info(self._capture, self.path)
        self._next = 0          # the index the next sequential read returns

    def read(self, index: int) -> np.ndarray:
        """Frame ``index``: BGR ``uint8 [H, W, 3]``.

        Raises:
            BadInputError: ``index`` is outside the frames the header announces, or the file
                ends early or is damaged before or at it (the message names the frame).
        """
        if not 0 <= index < self.info.frames:
            raise BadInputError(self.path, f"has {self.info.frames} frames; frame {index}"
                                " (0-based) is not one of them")
        with _ffmpeg_messages() as messages:
            if not self._next <= index <= self._next + SEEK_AHEAD:
                self._seek(index)
            while self._next < index:
                if not self._capture.grab():
                    break
                self._next += 1
            ok, frame = (self._capture.read() if self._next == index else (False, None))
        if messages:
            self._reopen()
            raise BadInputError(self.path, f"frame {index} (0-based): damaged data, FFmpeg"
                                f" reports: {'; '.join(messages[:2])}")
        if not ok or frame is None:
            self._fail(index)
        self._next = index + 1
        if frame.shape[:2] != self.info.size or frame.dtype != np.uint8 or frame.ndim != 3:
            raise BadInputError(self.path, f"frame {index} decodes to {frame.shape}, not the"
                                f" {self.info.size[1]}x{self.info.size[0]} of its header")
        return frame

    def _seek(self, index: int) -> None:
        self._capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        where = int(self._capture.get(cv2.CAP_PROP_POS_FRAMES))
        if where != index:      # the backend could not land on it: decode from the start
            self._reopen()
        else:
            self._next = index

    def _reopen(self) -> None:
        self._capture.release()
        self._capture = _capture(self.path)
        self._next = 0

    def _fail(self, index: int) -> None:
        self._reopen()          # the capture's state after a failed read is not to be trusted
        raise BadInputError(self.path, f"cannot decode frame {index} (0-based) of the"
                            f" {self.info.frames} its header announces: the file ends early or"
                            " is damaged there")

    def close(self) -> None:
        self._capture.release()


_OPEN: OrderedDict[tuple[Path, int, int], VideoFile] = OrderedDict()


def open_video(path: str | os.PathLike[str]) -> VideoFile:
    """The process's open :class:`VideoFile` of ``path`` (the last :data:`OPEN_FILES` are kept
    open, the least recently used closed; a file changed since it was opened is opened again);
    BadInputError as :func:`video_info`."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise BadInputError(path, "missing video") from None
    key = (path, stat.st_size, stat.st_mtime_ns)
    video = _OPEN.pop(key, None)
    if video is None:
        video = VideoFile(path)
    _OPEN[key] = video
    while len(_OPEN) > OPEN_FILES:
        _OPEN.popitem(last=False)[1].close()
    return video


def close_videos() -> None:
    """Close every file :func:`open_video` holds."""
    while _OPEN:
        _OPEN.popitem()[1].close()


def read_frame(path: str | os.PathLike[str], index: int) -> np.ndarray:
    """Frame ``index`` (0-based) of the video at ``path`` as RGB ``uint8 [H, W, 3]``."""
    return cv2.cvtColor(open_video(path).read(index), cv2.COLOR_BGR2RGB)


def read_map(path: str | os.PathLike[str], index: int, conversion: int = cv2.COLOR_BGR2GRAY
             ) -> np.ndarray:
    """Frame ``index`` (0-based) of a gaze-map video as greyscale ``uint8 [H, W]``, converted
    with OpenCV colour ``conversion`` from the decoded BGR frame (the dataset's own choice)."""
    return cv2.cvtColor(open_video(path).read(index), conversion)
