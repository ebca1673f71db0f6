"""``python -m salmm.predict``: saliency heat maps for a frame, a folder of frames, a video or a
prepared split.

``--input`` is one of

* a prepared dataset (a folder with ``manifest.json``): the frames of ``--split`` at the
  prepared size, each shown as ``frame | prediction overlay | ground-truth overlay`` under
  captions "frame", "prediction", "ground truth"; CLIP
  embeddings from the cache with ``--cached-clip``, else the model's inline CLIP;
* a folder of frames (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, in name order), one image, or a
  video (anything OpenCV's ffmpeg backend reads): each frame is decoded in full and resized to
  the model's size with ``cv2.resize(INTER_CUBIC)`` as ``python -m pipeline normalize`` does,
  then the prediction is drawn over the original frame at its own resolution. Raw inputs have
  no cached embeddings, so CLIP runs inline (``--clip-pretrained none``: random weights, for
  smoke runs only, and logged as such).

Outputs in ``--out``: one PNG per frame (``<sample key>.png``, ``<image stem>.png`` or
``frame_NNNNNN.png`` for videos) and, for more than one frame, an animation of them
(``animation.mp4``, H.264 through imageio-ffmpeg; ``--animation gif`` for a GIF; at most
:data:`ANIMATION_WIDTH` pixels wide). Every file is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.progress import progress
from pipeline.formats.prepared import PreparedDataset
from salmm.data.samples import batched, iter_samples
from salmm.data.sources import (
    IMAGE_SUFFIXES,
    Item,
    folder_images,
    image_items,
    open_video,
    video_items,
)
from salmm.data.stages import EmbeddingTable
from salmm.deploy.options import PICTURES_FPS, PredictOptions
from salmm.evaluation import metrics
from salmm.model.loading import LoadedModel, load_model, predict_batch
from salmm.render import overlay

log = logging.getLogger("salmm.predict")

PANEL_TITLES = ("frame", "prediction", "ground truth")
ANIMATION_WIDTH = 768


# ---- inputs ------------------------------------------------------------------------------------


def input_kind(path: str) -> str:
    """"prepared", "folder", "image" or "video"; BadInputError if ``path`` does not exist."""
    p = Path(path)
    if p.is_dir():
        return "prepared" if (p / "manifest.json").exists() else "folder"
    if not p.exists():
        raise BadInputError(path, "no such file or folder")
    return "image" if p.suffix.lower() in IMAGE_SUFFIXES else "video"


def prepared_items(data: PreparedDataset, split: str) -> Iterator[Item]:
    """A prepared split's samples: frame and label at the prepared size."""
    for sample in iter_samples(data, split):
        rgb = np.ascontiguousarray(sample["frame"].numpy().transpose(1, 2, 0))
        yield Item(sample["key"], rgb, rgb, sample["label"][0].numpy(), sample["key"],
                   sample["index"])


def limited(items: Iterator[Item], limit: int | None) -> Iterator[Item]:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


# ---- pictures ----------------------------------------------------------------------------------


def _heat_panel(frame: np.ndarray, saliency: np.ndarray, colormap: str, alpha: float
                ) -> np.ndarray:
    """``saliency`` over ``frame`` drawn on its own scale (:func:`overlay.display_range`), the
    colour scale under it."""
    shown_range = overlay.display_range(saliency)
    panel = overlay.overlay(frame, saliency, colormap=colormap, alpha=alpha,
                            value_range=shown_range)
    return np.concatenate([panel, overlay.scale_strip(panel.shape[1], shown_range, colormap)])


def picture(item: Item, pred: np.ndarray, colormap: str, alpha: float, caveat: str = ""
            ) -> np.ndarray:
    """What is saved for one frame: the prediction over the frame (its colour scale under it;
    the frame's name, and with a label its CC, in a corner), next to the frame and the
    ground-truth overlay when there is a label; ``caveat`` (e.g. synthetic data, random CLIP
    weights) in a banner across the top."""
    shown = _heat_panel(item.frame, pred, colormap, alpha)
    corner = item.name if item.label is None else \
        f"{item.name}  CC {metrics.cc(pred, item.label):.3f}"
    shown = overlay.stamp(shown, corner)
    if item.label is None:
        return overlay.banner(shown, caveat) if caveat else shown
    truth = _heat_panel(item.frame, item.label, colormap, alpha)
    frame = np.concatenate([item.frame,
                            np.full((truth.shape[0] - item.frame.shape[0], truth.shape[1], 3),
                                    255, np.uint8)])
    panels = overlay.side_by_side([frame, shown, truth], titles=PANEL_TITLES)
    return overlay.banner(panels, caveat) if caveat else panels


def caveat_of(source: Source, loaded: LoadedModel) -> str:
    """What the pictures' numbers do not mean, in a few words ("" when nothing)."""
    return overlay.caveat(source.data is not None and source.data.synthetic,
                          loaded.clip.pretrained is None)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Source:
    """An opened ``--input``: its kind ("prepared", "folder", "image", "video"), frames to come
    (None: unknown), frames per second (videos, when known), and what reads it."""

    kind: str
    total: int | None = None
    fps: float | None = None
    data: PreparedDataset | None = None
    files: list[Path] | None = None
    capture: cv2.VideoCapture | None = None


def open_source(opts: PredictOptions) -> Source:
    """``opts.input``, checked before the model is loaded (BadInputError, one line)."""
    kind = input_kind(opts.input)
    if opts.cached_clip and kind != "prepared":
        raise BadInputError(opts.input, "--cached-clip needs a prepared dataset as --input; raw"
                            " frames and videos have no cached embeddings")
    if kind == "prepared":
        data = PreparedDataset.open(opts.input)
        return Source(kind, data.checked_split(opts.split), data=data)
    if kind == "folder":
        files = folder_images(opts.input)
        return Source(kind, len(files), files=files)
    if kind == "image":
        return Source(kind, 1, files=[Path(opts.input)])
    capture, fps, total = open_video(opts.input)
    return Source(kind, total, fps, capture=capture)


def source_items(opts: PredictOptions, source: Source, size: tuple[int, int]) -> Iterator[Item]:
    """The source's frames as :class:`Item` at the model's ``size`` (height, width)."""
    if source.kind == "prepared":
        return prepared_items(source.data, opts.split)
    if source.kind == "video":
        return video_items(opts.input, source.capture, size, source.total,
                           opts.allow_short_video)
    return image_items(source.files, size)


def predict(opts: PredictOptions) -> list[Path]:
    """Run ``opts``; returns the files written (PNGs, then the animation if any)."""
    source = open_source(opts)
    loaded: LoadedModel = load_model(opts.checkpoint, inline_clip=not opts.cached_clip,
                                     given_clip=dict(opts.clip), device=opts.device,
                                     amp=opts.amp)
    size = (source.data.size if source.data is not None
            else opts.size or loaded.size)
    if size[0] % 32 or size[1] % 32:
        raise BadInputError(opts.input, f"frames would be fed at {size[1]}x{size[0]}; SalMM needs"
                            " width and height that are multiples of 32 (see --size)")
    table = None
    if opts.cached_clip:
        cache_path, _ = source.data.clip_cache(opts.cache, loaded.clip.identity(), [opts.split])
        table = EmbeddingTable(cache_path, opts.split)
    total = source.total if opts.limit is None or source.total is None \
        else min(source.total, opts.limit)
    Folder(opts.out).makedirs()
    caveat = caveat_of(source, loaded)
    written: list[Path] = []
    frames: list[np.ndarray] = []
    with progress(total=total, unit="frame", desc="predict") as bar:
        for batch in batched(limited(source_items(opts, source, size), opts.limit),
                             opts.batch_size):
            x = torch.from_numpy(np.stack([it.model_input.transpose(2, 0, 1) for it in batch]))
            emb = (torch.stack([torch.from_numpy(table.lookup(it.index, it.key, False))
                                for it in batch]) if table is not None else None)
            for item, pred in zip(batch, predict_batch(loaded, x, emb)):
                image = picture(item, pred, opts.colormap, opts.alpha, caveat)
                path = Path(opts.out) / f"{item.name}.png"
                overlay.write_png(path, image)
                written.append(path)
                if opts.animation != "none":
                    frames.append(overlay.at_most_wide(image, ANIMATION_WIDTH))
                bar.update(1)
    log.info("wrote %d picture(s) to %s", len(written), opts.out)
    if len(frames) > 1:
        fps = opts.fps or source.fps or PICTURES_FPS
        path = Path(opts.out) / f"animation.{overlay.animation_format(opts.animation)}"
        overlay.write_animation(path, frames, fps)
        written.append(path)
        log.info("animation of %d frames at %.3g fps: %s", len(frames), fps, path)
    return written
