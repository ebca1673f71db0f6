"""Pictures of saliency maps: heat-map colouring, overlays on the frame, captioned side-by-side
panels, and animations (MP4 through imageio's ffmpeg backend, or GIF).

All images are uint8 RGB ``[H, W, 3]``; saliency maps are float ``[h, w]`` of any range (each
is min-max normalised to [0, 1] first; a constant map shows as all zero). Every file is written
atomically (temporary name, then rename), so a half-written picture never carries the final
name.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import cv2
import imageio.v3 as iio
import imageio_ffmpeg
import numba
import numpy as np

from pipeline.core.errors import OutputError
from pipeline.core.fsio import Folder
from salmm.render.style import (  # the names this module draws
    ANIMATION_FORMATS,
    COLORMAP_NAMES,
    DEFAULT_ALPHA,
    DEFAULT_COLORMAP,
)

log = logging.getLogger(__name__)

COLORMAPS = {name: getattr(cv2, f"COLORMAP_{name.upper()}") for name in COLORMAP_NAMES}


def _extremes(saliency: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(the map as float32 [h, w], its min, its max); ValueError for another shape, NaN or
    inf."""
    m = np.asarray(saliency, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected a [h, w] saliency map, got shape {m.shape}")
    low, high = float(m.min()), float(m.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("saliency map contains NaN or inf")
    return m, low, high


def normalize(saliency: np.ndarray) -> np.ndarray:
    """float32 [h, w] in [0, 1]: ``(m - min) / (max - min)``; a constant map gives zeros."""
    m, low, high = _extremes(saliency)
    if high <= low:
        return np.zeros_like(m)
    return (m - low) / (high - low)


def display_range(saliency: np.ndarray) -> tuple[float, float]:
    """(low, high) a map is drawn between in pictures: its median (drawn without colour) to its
    maximum (full colour), so the upper half of its values - where a model puts its attention -
    fills the scale even when the map is flat; min to max when the median is the maximum."""
    m = np.asarray(saliency, dtype=np.float32)
    low, high = float(np.median(m)), float(m.max())
    return (float(m.min()), high) if high <= low else (low, high)


def stretch(saliency: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """float32 [h, w] in [0, 1]: the map scaled so ``value_range`` becomes [0, 1], clipped."""
    low, high = value_range
    m = np.asarray(saliency, dtype=np.float32)
    if not np.isfinite(m).all():
        raise ValueError("saliency map contains NaN or inf")
    if high <= low:
        return np.zeros_like(m)
    return np.clip((m - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _fit(saliency: np.ndarray, size: tuple[int, int],
         value_range: tuple[float, float] | None = None) -> np.ndarray:
    """The map scaled to [0, 1] (min-max, or ``value_range``) and resized (bicubic, clipped to
    [0, 1]) to ``size`` (height, width)."""
    m = normalize(saliency) if value_range is None else stretch(saliency, value_range)
    if m.shape != tuple(size):
        m = np.clip(cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    return m


def colorize(saliency: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """Heat map of ``saliency`` [h, w]: uint8 RGB [h, w, 3] (OpenCV colour map ``colormap``),
    each pixel its level's colour (:func:`levels`, :func:`palette`): OpenCV's colours, looked
    up in one numba pass (a 640x360 map: 0.15 against 0.35 ms for ``applyColorMap`` and the
    swap to RGB)."""
    colours = palette(colormap)
    shades = levels(saliency)
    out = np.empty((*shades.shape, 3), dtype=np.uint8)
    _paint(shades.ravel(), colours, out.reshape(-1, 3))
    return out


@functools.cache
def palette(colormap: str) -> np.ndarray:
    """uint8 RGB [256, 3], read-only: the colour OpenCV's colour map ``colormap`` gives each
    level 0..255."""
    if colormap not in COLORMAPS:
        raise ValueError(f"colour map must be one of {sorted(COLORMAPS)}, got {colormap!r}")
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    colours = cv2.cvtColor(cv2.applyColorMap(ramp, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)
    colours = np.ascontiguousarray(colours.reshape(256, 3))
    colours.setflags(write=False)
    return colours


@numba.njit(cache=True, nogil=True)
def _paint(shades, colours, out):
    """out[i] = colours[shades[i]]: shades uint8 [n], colours uint8 [256, 3], out [n, 3]."""
    for i in range(shades.shape[0]):
        k = shades[i]
        out[i, 0], out[i, 1], out[i, 2] = colours[k, 0], colours[k, 1], colours[k, 2]


def levels(saliency: np.ndarray) -> np.ndarray:
    """uint8 [h, w]: ``round(normalize(saliency) * 255)`` in float32, rounded half to even - the
    numpy expression's bits, its four passes after the extremes as one (a 640x360 map: about
    0.09 against 0.33 ms); a constant map gives zeros."""
    m, low, high = _extremes(saliency)
    out = np.zeros(m.shape, dtype=np.uint8)
    if high > low:
        _scaled_levels(np.ascontiguousarray(m).ravel(), np.float32(low), np.float32(high - low),
                       out.ravel())
    return out


@numba.njit(cache=True, nogil=True)
def _scaled_levels(m, low, span, out):
    """out = uint8(rint((m - low) / span * 255)) over flat m, out [n]; low and span float32 (a
    Python float would make the arithmetic float64)."""
    scale = np.float32(255.0)
    for i in range(m.shape[0]):
        out[i] = np.uint8(np.rint((m[i] - low) / span * scale))


def overlay(frame: np.ndarray, saliency: np.ndarray, *, colormap: str = DEFAULT_COLORMAP,
            alpha: float = DEFAULT_ALPHA, value_range: tuple[float, float] | None = None
            ) -> np.ndarray:
    """The heat map of ``saliency`` blended on ``frame`` (uint8 RGB [H, W, 3]) -> same shape.

    The map is scaled to [0, 1] (min-max, or from ``value_range``'s low to its high; see
    :func:`display_range`) and resized to the frame (bicubic); each pixel mixes in the colour
    with weight ``alpha * s`` (s in [0, 1] its saliency), so non-salient areas show the frame
    unchanged and the most salient ones ``alpha`` parts colour.
    """
    frame = np.ascontiguousarray(_as_rgb(frame))  # (the blend's rows are flat)
    s = _fit(saliency, frame.shape[:2], value_range)
    out = np.empty_like(frame)
    _blend(frame, colorize(s, colormap), s, np.float32(alpha), out)
    return out


@numba.njit(cache=True, nogil=True)
def _blend(frame, heat, s, alpha, out):
    """out = round(frame * (1 - w) + heat * w), w = alpha * s, in float32 and rounded half to
    even, clipped to [0, 255] (what the numpy expression computes, in one pass); uint8 RGB
    frame, heat, out [H, W, 3] (C-contiguous), s float32 [H, W]. A row at a time, its
    weights first repeated for the three channels, so the blend is one loop over the row's
    W * 3 values, which vectorises (a 640x360 frame: 0.29 against 1.05 ms looping over the
    channels of a pixel)."""
    one = np.float32(1.0)
    height, width = s.shape
    weights = np.empty(3 * width, dtype=np.float32)
    for y in range(height):
        row = s[y]
        for x in range(width):
            w = alpha * row[x]
            weights[3 * x], weights[3 * x + 1], weights[3 * x + 2] = w, w, w
        pixels, colours, into = frame[y].ravel(), heat[y].ravel(), out[y].ravel()
        for i in range(3 * width):
            w = weights[i]
            v = np.rint(np.float32(pixels[i]) * (one - w) + np.float32(colours[i]) * w)
            into[i] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


CAPTION_FONT = cv2.FONT_HERSHEY_SIMPLEX


def caption_scale(text: str, width: int) -> float:
    """Font scale at which ``text`` fits ``width`` pixels with a small margin, 0.35 to 1.0."""
    (text_w, _), _ = cv2.getTextSize(text, CAPTION_FONT, 1.0, 1)
    return float(np.clip((width - 6) / max(text_w, 1), 0.35, 1.0))


def caption(panel: np.ndarray, text: str, scale: float | None = None) -> np.ndarray:
    """``panel`` (uint8 RGB [H, W, 3]) under a white strip holding ``text`` in black, centred,
    at font ``scale`` (default :func:`caption_scale`): [H + strip, W, 3]."""
    panel = _as_rgb(panel)
    width = panel.shape[1]
    scale = caption_scale(text, width) if scale is None else scale
    (text_w, _), _ = cv2.getTextSize(text, CAPTION_FONT, scale, 1)
    (_, text_h), base = cv2.getTextSize("Hg", CAPTION_FONT, scale, 1)  # same strip for any text
    strip = np.full((text_h + base + 8, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (max(2, (width - text_w) // 2), text_h + 4), CAPTION_FONT, scale,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


CAVEAT_COLOUR = (200, 30, 30)
"""Background of the stamps that say what a picture's numbers do not mean (synthetic data,
random CLIP weights)."""


def caveat(synthetic: bool, random_clip: bool) -> str:
    """What a picture's numbers do not mean, in a few words ("" when nothing): the one text
    every picture, stream video and training plot carries."""
    said = [text for flag, text in ((synthetic, "SYNTHETIC DATA"),
                                    (random_clip, "RANDOM CLIP WEIGHTS")) if flag]
    return " / ".join(said) + ": a smoke run, not real results" if said else ""


def stamp(image: np.ndarray, text: str, *, corner: str = "top-left",
          background: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """A copy of ``image`` (uint8 RGB) with ``text`` in white on a ``background`` box in a
    ``corner`` ("top-left", "top-right", "bottom-left", "bottom-right"), sized to the image."""
    out = _as_rgb(image).copy()
    height, width = out.shape[:2]
    scale = float(np.clip(width / 700, 0.35, 0.8))
    (text_w, text_h), base = cv2.getTextSize(text, CAPTION_FONT, scale, 1)
    text_w = min(text_w, width - 8)
    x = 4 if corner.endswith("left") else width - text_w - 8
    y = 4 if corner.startswith("top") else height - text_h - base - 8
    cv2.rectangle(out, (x, y), (x + text_w + 4, y + text_h + base + 4), background, cv2.FILLED)
    cv2.putText(out, text, (x + 2, y + text_h + 2), CAPTION_FONT, scale, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out


def banner(image: np.ndarray, text: str,
           background: tuple[int, int, int] = CAVEAT_COLOUR) -> np.ndarray:
    """``image`` (uint8 RGB [H, W, 3]) under a ``background`` strip holding ``text`` in white,
    scaled to fit the width: [H + strip, W, 3]."""
    image = _as_rgb(image)
    width = image.shape[1]
    scale = caption_scale(text, width)
    (text_w, _), _ = cv2.getTextSize(text, CAPTION_FONT, scale, 1)
    (_, text_h), base = cv2.getTextSize("Hg", CAPTION_FONT, scale, 1)
    strip = np.empty((text_h + base + 8, width, 3), np.uint8)
    strip[:] = background
    cv2.putText(strip, text, (max(2, (width - text_w) // 2), text_h + 4), CAPTION_FONT, scale,
                (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([strip, image], axis=0)


def scale_strip(width: int, value_range: tuple[float, float],
                colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """uint8 RGB [h, width, 3]: the colour scale a heat map was drawn with - the colour map as a
    bar between its two values (no colour below the low one)."""
    low, high = value_range
    labels = (f"{low:.3f}", f"{high:.3f}")
    scale = float(np.clip(width / 700, 0.35, 0.6))
    (left_w, text_h), base = cv2.getTextSize(labels[0], CAPTION_FONT, scale, 1)
    (right_w, _), _ = cv2.getTextSize(labels[1], CAPTION_FONT, scale, 1)
    strip = np.full((text_h + base + 8, width, 3), 255, np.uint8)
    bar_from, bar_to = left_w + 8, max(left_w + 9, width - right_w - 8)
    ramp = np.linspace(0.0, 1.0, bar_to - bar_from, dtype=np.float32)[None, :]
    strip[3:-3, bar_from:bar_to] = colorize(np.repeat(ramp, strip.shape[0] - 6, 0), colormap)
    for text, x in ((labels[0], 3), (labels[1], bar_to + 4)):
        cv2.putText(strip, text, (x, text_h + 3), CAPTION_FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def at_most_wide(image: np.ndarray, width: int) -> np.ndarray:
    """``image`` [H, W, ...] shrunk (INTER_AREA, aspect kept) to at most ``width`` pixels wide;
    itself when it is not wider."""
    height, wide = image.shape[:2]
    if wide <= width:
        return image
    return cv2.resize(image, (width, max(1, round(height * width / wide))),
                      interpolation=cv2.INTER_AREA)


def binned_to_width(image: np.ndarray, width: int) -> np.ndarray:
    """``image`` [H, W, ...] shrunk by the smallest whole factor f that brings it to at most
    ``width`` pixels wide: INTER_AREA to round(H / f) x round(W / f), so where f divides both
    sides each pixel is the mean of an f x f block (1280x720 at 768: 640x360, 2x2 blocks); itself
    when it is not wider. OpenCV bins by a whole factor some 10x faster than it shrinks by an
    uneven one (1280x720: 0.26 against 3.4 ms to 768x432, one thread)."""
    height, wide = image.shape[:2]
    factor = -(-wide // width)
    if factor <= 1:
        return image
    return cv2.resize(image, (round(wide / factor), max(1, round(height / factor))),
                      interpolation=cv2.INTER_AREA)


def side_by_side(panels: Sequence[np.ndarray], gap: int = 4,
                 titles: Sequence[str] | None = None) -> np.ndarray:
    """Panels (uint8 RGB, equal heights) left to right with ``gap`` white columns between, each
    under its caption (:func:`caption`, one font size for all) when ``titles`` are given."""
    panels = [_as_rgb(p) for p in panels]
    height = panels[0].shape[0]
    if any(p.shape[0] != height for p in panels):
        raise ValueError(f"panels differ in height: {[p.shape[0] for p in panels]}")
    if titles is not None:
        if len(titles) != len(panels):
            raise ValueError(f"{len(titles)} titles for {len(panels)} panels")
        scale = min(caption_scale(t, p.shape[1]) for p, t in zip(panels, titles, strict=True))
        panels = [caption(p, t, scale) for p, t in zip(panels, titles, strict=True)]
        height = panels[0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, p in enumerate(panels):
        parts.extend([spacer, p] if i else [p])
    return np.concatenate(parts, axis=1)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG bytes."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(_as_rgb(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write ``image`` (uint8 RGB) as a PNG at ``path``, atomically."""
    path = Path(path)
    Folder(path.parent).write_bytes(path.name, encode_png(image))


def mp4_available() -> bool:
    """Whether imageio can write MP4 here (its ffmpeg plugin needs imageio-ffmpeg, a
    dependency of salmm that bundles the ffmpeg binary)."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def animation_format(requested: str) -> str | None:
    """The format an animation is written in: ``"mp4"``, ``"gif"`` or None (``"none"``).

    ``"auto"`` (the default) and ``"mp4"`` give MP4 when :func:`mp4_available` (it is, where
    salmm's dependencies are installed), else GIF (logged).
    """
    if requested not in ANIMATION_FORMATS:
        raise ValueError(f"animation format must be one of {ANIMATION_FORMATS}, got {requested!r}")
    if requested == "none":
        return None
    if requested == "gif":
        return "gif"
    if mp4_available():
        return "mp4"
    level = logging.WARNING if requested == "mp4" else logging.INFO
    log.log(level, "no ffmpeg backend for imageio (install imageio-ffmpeg for MP4): writing a GIF")
    return "gif"


def _pad_to_blocks(image: np.ndarray, block: int = 16) -> np.ndarray:
    """Pad right and bottom with white to multiples of ``block`` pixels (video codecs work on
    16x16 macro blocks; imageio would otherwise resample the frame)."""
    height, width = image.shape[:2]
    pad = ((0, -height % block), (0, -width % block), (0, 0))
    return np.pad(image, pad, constant_values=255)


class VideoWriter:
    """An MP4 (H.264, yuv420p) written frame by frame through imageio-ffmpeg's ffmpeg process,
    atomically: it carries a temporary name until :meth:`close`, and leaving a ``with`` block
    on an exception removes it. Frames are uint8 RGB [H, W, 3], all
    of the first frame's size, padded to multiples of 16 pixels (:func:`_pad_to_blocks`).
    ``preset``: libx264's speed against file size (``veryfast``: a third of ``medium``'s CPU)."""

    def __init__(self, path: str | os.PathLike[str], fps: float, preset: str = "medium") -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path, self.fps, self.preset = Path(path), fps, preset
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}{self.path.suffix}")
        self.frames = 0
        self._shape: tuple[int, ...] | None = None
        self._encoder = None

    def write(self, image: np.ndarray) -> None:
        frame = _pad_to_blocks(_as_rgb(image))
        if self._encoder is None:
            Folder(self.path.parent).makedirs()
            remove_stale_temporaries(self.path)
            self._shape = frame.shape
            with self._ffmpeg():
                self._encoder = imageio_ffmpeg.write_frames(
                    str(self.tmp), (frame.shape[1], frame.shape[0]), fps=self.fps,
                    codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                    output_params=["-preset", self.preset])
                self._encoder.send(None)
        elif frame.shape != self._shape:
            raise ValueError(f"{self.path}: video frames differ in size")
        with self._ffmpeg():
            self._encoder.send(np.ascontiguousarray(frame))
        self.frames += 1

    @contextmanager
    def _ffmpeg(self) -> Iterator[None]:
        """ffmpeg failing to write (a full disk, no permission: it exits and its pipe breaks) is
        one OutputError line naming the video."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            said = str(err).strip().splitlines()
            reason = said[-1] if said else type(err).__name__
            raise OutputError(self.path, f"cannot be written (ffmpeg: {reason})") from None

    def close(self) -> int:
        """Finish the file and give it its name; returns the number of frames (ValueError, and
        no file, if there were none)."""
        if self._encoder is None:
            raise ValueError(f"{self.path}: no frames to write")
        encoder, self._encoder = self._encoder, None
        try:
            with self._ffmpeg():
                encoder.close()
            os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.frames

    def abort(self) -> None:
        """Stop and remove the unfinished file."""
        if self._encoder is not None:
            encoder, self._encoder = self._encoder, None
            try:
                encoder.close()
            except Exception:
                log.debug("ffmpeg failed while an unfinished video was abandoned", exc_info=True)
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files (``.<stem>.tmp-<pid><suffix>``) that writers of ``path``
    killed before they finished left behind: those whose process is gone."""
    removed = []
    for leftover in path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"):
        pid = leftover.name[len(f".{path.stem}.tmp-"):-len(path.suffix) or None]
        if pid.isdigit() and not _running(int(pid)):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_animation(path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: float
                    ) -> int:
    """Write uint8 RGB frames (equal sizes) as an animation; the format follows the suffix
    (``.gif``: looping, ``1000 / fps`` ms a frame - Pillow merges identical consecutive frames
    into one longer frame; ``.mp4``: a :class:`VideoWriter`). Atomic. Returns the number of
    frames written; ValueError if there are none."""
    path = Path(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if path.suffix == ".mp4":
        with VideoWriter(path, fps) as video:
            for frame in frames:
                video.write(frame)
        return video.frames
    if path.suffix != ".gif":
        raise ValueError(f"{path}: animation must be .gif or .mp4")
    images = [_as_rgb(f) for f in frames]
    if not images:
        raise ValueError(f"{path}: no frames to animate")
    if any(f.shape != images[0].shape for f in images):
        raise ValueError(f"{path}: animation frames differ in size")
    Folder(path.parent).makedirs()
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        iio.imwrite(tmp, np.stack(images), plugin="pillow", duration=1000.0 / fps, loop=0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(images)
