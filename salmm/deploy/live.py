"""``python -m salmm.stream``: driver attention live, frame by frame, on a video, a camera, a
folder of frames or an MJPEG stream.

``python -m salmm.stream --checkpoint CKPT --input VIDEO|CAMERA_INDEX|FOLDER|- [--refresh-every
K] [--backend torch|onnx] [--out overlay.mp4] [--show]``

Each frame is decoded, resized to the model's size as the pipeline does (``cv2.resize``
INTER_CUBIC), embedded by the frozen CLIP encoder, run through SalM², and drawn as a heat map
over the frame (binned to at most :data:`DISPLAY_WIDTH` pixels wide) into ``--out`` (MP4, H.264;
written atomically) and a window with ``--show``. Inputs:

* a video file (anything OpenCV's ffmpeg backend reads; a file that ends before the frames it
  announces is refused unless ``--allow-short-video``), a folder of frames (name order), a
  camera index (``0``): OpenCV capture. A camera is live: frames that arrive while the model is
  busy are dropped (counted) rather than queued, so the overlay stays current;
* ``-``: an MJPEG byte stream on standard input (concatenated JPEG images, e.g. ``ffmpeg -i
  rtsp://... -f mjpeg -``), split by :func:`salmm.data.sources.split_mjpeg` and decoded strictly.

**Semantic refresh**: CLIP's embedding changes slowly from frame to frame; ``--refresh-every
K`` runs CLIP on every K-th frame only and reuses the last embedding between (K = 1, the
default, is the published model). Flips are not used at inference.

Backends: ``torch`` (PyTorch, on ``--device``; on a CPU SalM² runs on the fused kernels of
:mod:`salmm.model.layer_cpu`) or ``onnx`` (onnxruntime on CPU, the graphs of
:mod:`salmm.export`: ``--onnx DIR`` names an export, checked against the checkpoint; without it
the checkpoint is exported once into :data:`EXPORT_CACHE`; SalM² runs on whichever of its graph
and the fused kernels is faster here, timed at start-up: the summary's ``salmm_engine``). The
checkpoint's CLIP options are checked as evaluate checks them.

Decoding and resizing run in a background thread (a camera's in
:class:`~pipeline.core.pipes.Latest`), overlapping the model. On a file or a folder the other
stages run beside the model too (:func:`run_loop`'s ``ahead`` and ``behind``): CLIP runs ahead, in
a thread a core, on each refreshed frame as soon as it is decoded, and the overlays are drawn and
handed to the encoder in a thread of their own, one frame behind; every stage runs on one
intra-op thread (``--threads`` says otherwise), so the stages share the cores instead of each
operator's thread team waiting for them. The predictions are those of the plain loop. More frames
a second, each a little later (K=8 on 2 cores: drawing behind gave 30.0-33.6 against 27.2-27.5
fps, latency p50 53-55 against 31-32 ms). A live source (a camera, standard input) cannot be read
ahead and wants the lowest latency: CLIP and drawing stay in the loop, on the thread governor's
count; so does drawing with ``--show``, whose window belongs to the loop. On a CPU the torch
backend's CLIP runs on packed weights (:mod:`pipeline.encoders.clip_packed`).

At the end (and live in the progress bar) it reports per-frame latency - from the loop taking
the decoded frame to its overlay handed to the writer: CLIP when the loop waited for it, SalM²,
drawing - as p50 / p95 / max, and the sustained frame rate: frames over the wall time of the
whole loop, decoding and writing included. Ctrl-C ends a stream normally (the video keeps what
was drawn); any other failure removes the unfinished video.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from pipeline.core.cpu import intra_op_threads, usable_cores
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.pipes import Latest, Sink, prefetch
from pipeline.core.progress import progress
from pipeline.encoders.clip_packed import inference_encoder
from salmm.data.sources import (
    Item,
    folder_images,
    image_items,
    mjpeg_items,
    network_input,
    open_camera,
    open_video,
    video_items,
)
from salmm.deploy.graphs import INT8_GRAPH, ExportOptions, checked_export, export
from salmm.deploy.options import EXPORT_CACHE, STREAM_FPS, StreamOptions
from salmm.model.devices import autocast
from salmm.model.loading import LoadedModel, load_model
from salmm.render import overlay

log = logging.getLogger("salmm.stream")

DISPLAY_WIDTH = 768
"""Widest overlay drawn: wider frames are first binned by the smallest whole factor that brings
them within it (:func:`~salmm.render.overlay.binned_to_width`; 1280x720 -> 640x360), since
colouring and encoding a full 1280x720 overlay would cost more than the model (end to end at K=8
on 2 cores: 43-44 fps against 37-40 with an uneven shrink to 768x432, which alone took 3.4 ms of
a frame)."""
ENCODER_PRESET = "ultrafast"
"""libx264 preset of ``--out``: the encoder shares the machine with the model, so the fastest
(end to end at K=8 on 2 cores: 28-29 fps against 24.5 with ``veryfast``, 13 ms of CPU a 768x432
frame, and far less than ``medium``'s 43 ms; the file is about twice ``veryfast``'s)."""
WINDOW = "salmm.stream"
DRAWN_BEHIND = 1
"""Frames that may wait for drawing while SalM² predicts the next one (``run_loop``'s
``behind``)."""
CLIP_WORKERS = 4
"""At most this many CLIP threads read a file ahead (one a core): enough for CLIP on every frame
to keep up with SalM² and drawing, without holding many decoded frames."""


# ---- the two backends ----------------------------------------------------------------------------


class Runner(Protocol):
    """One backend: ``embed`` uint8 RGB [h, w, 3] -> float32 [1, D]; ``saliency`` uint8 RGB
    [h, w, 3] and the embedding -> float32 [h, w] in (0, 1)."""

    def embed(self, frame: np.ndarray) -> np.ndarray: ...

    def saliency(self, frame: np.ndarray, embedding: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """Eager PyTorch: the checkpoint's SalMM and its CLIP encoder on the checkpoint's device
    (on a CPU, its transformer on weights packed for one frame a call:
    :mod:`pipeline.encoders.clip_packed`)."""

    def __init__(self, loaded: LoadedModel, encoder: bool = True) -> None:
        self.loaded = loaded
        self.encoder = inference_encoder(loaded.clip, str(loaded.device)) if encoder else None

    def _tensor(self, frame: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(network_input(frame)).to(self.loaded.device)

    def embed(self, frame: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.encoder.encode(self._tensor(frame)).cpu().numpy()

    def saliency(self, frame: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(self.loaded.device, self.loaded.autocast):
            emb = torch.from_numpy(embedding).to(self.loaded.device)
            return self.loaded.model(self._tensor(frame), emb)[0, 0].float().cpu().numpy()


def session(path: Path, options: Any) -> Any:
    """An onnxruntime CPU session of the graph at ``path``; BadInputError (one line naming it)
    when onnxruntime refuses the graph."""
    import onnxruntime  # lazy: the deploy extra, needed by this backend only

    try:
        return onnxruntime.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own kinds
        said = str(err).strip().splitlines()
        raise BadInputError(path, f"onnxruntime cannot load it"
                            f" ({said[0] if said else type(err).__name__})") from None


class OnnxRunner:
    """onnxruntime on CPU: ``clip.onnx`` of an export folder for CLIP; for SalMM, whichever of
    ``salmm.onnx`` under onnxruntime and the checkpoint's network on salmm's fused CPU kernels
    (:mod:`salmm.model.layer_cpu`; the same weights, checked against each other at export)
    is faster on this machine, timed at start-up on the frame size (``engine`` says which).
    onnxruntime cannot fuse the selective scan, which its graph spells out as plain
    operators, so on a CPU the kernels usually win."""

    ENGINES = ("onnxruntime", "salmm-cpu-kernels")

    def __init__(self, folder: Path, threads: int, loaded: LoadedModel | None = None,
                 size: tuple[int, int] | None = None, int8: bool = False) -> None:
        """``loaded`` (the exported checkpoint) and ``size`` (height, width of the frames) let
        SalMM run on the kernels when they are faster; without them onnxruntime runs both.
        ``int8``: CLIP from ``clip-int8.onnx``."""
        import onnxruntime  # lazy: the deploy extra, needed by this backend only

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no spinning after a run: its threads would hold the core PyTorch's next operator
        # (SalMM on the kernels) waits for - 38 ms against 15 ms a frame on 2 cores here
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.clip, self.salmm = (session(folder / f"{name}.onnx", options)
                                 for name in (INT8_GRAPH if int8 else "clip", "salmm"))
        cpu = loaded is not None and size is not None and loaded.device.type == "cpu"
        self.torch = TorchRunner(loaded, encoder=False) if cpu else None
        self.engine = self.ENGINES[0]
        if self.torch is not None:
            frame = np.zeros((*size, 3), dtype=np.uint8)
            embedding = np.zeros((1, self.salmm.get_inputs()[1].shape[1]), dtype=np.float32)
            times = {name: _median_s(lambda run=run: run(frame, embedding))
                     for name, run in zip(self.ENGINES, (self._onnx_saliency,
                                                         self.torch.saliency))}
            self.engine = min(self.ENGINES, key=times.get)
            log.info("SalMM on %s: %s", self.engine, ", ".join(
                f"{name} {1e3 * seconds:.1f} ms a frame" for name, seconds in times.items()))

    def embed(self, frame: np.ndarray) -> np.ndarray:
        return self.clip.run(None, {"frame": network_input(frame)})[0]

    def _onnx_saliency(self, frame: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        feed = {"frame": network_input(frame), "embedding": embedding}
        return self.salmm.run(None, feed)[0][0, 0]

    def saliency(self, frame: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        if self.engine == "onnxruntime":
            return self._onnx_saliency(frame, embedding)
        return self.torch.saliency(frame, embedding)


def _median_s(call: Any, repeats: int = 5) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---- options -------------------------------------------------------------------------------------


@dataclass
class Source:
    """An opened ``--input``: its frames as :class:`Item`, how many there are (None: unknown or
    live), its frame rate when known, and the :class:`Latest` stage of a live camera."""

    items: Iterator[Item]
    total: int | None
    fps: float | None
    live: Latest | None = None


def open_source(opts: StreamOptions, size: tuple[int, int]) -> Source:
    """``opts.input`` opened (BadInputError, one line, when it cannot be)."""
    spec = opts.input
    if spec == "-":
        return Source(mjpeg_items(sys.stdin.buffer, size), None, None)
    if spec.isdigit():
        capture, fps = open_camera(int(spec))
        live = Latest(video_items(f"camera {spec}", capture, size))
        return Source(iter(live), None, fps, live)
    path = Path(spec)
    if path.is_dir():
        files = folder_images(spec)
        return Source(image_items(files, size), len(files), None)
    if not path.exists():
        raise BadInputError(spec, "no such file or folder (or camera index)")
    capture, fps, total = open_video(spec)
    return Source(video_items(spec, capture, size, total, opts.allow_short_video), total, fps)


# ---- the loop ------------------------------------------------------------------------------------


@dataclass
class Report:
    """What a run measured: ``latency_ms`` per frame, the loop's wall seconds, the frames CLIP
    ran on, and the live frames dropped while the model was busy."""

    latency_ms: list[float]
    wall_s: float
    clip_frames: int
    dropped: int = 0

    @property
    def fps(self) -> float:
        return len(self.latency_ms) / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latency_ms)
        return {"frames": len(lat), "fps": round(self.fps, 2), "clip_frames": self.clip_frames,
                "dropped": self.dropped,
                "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                               "p95": round(float(np.percentile(lat, 95)), 2),
                               "max": round(float(lat.max()), 2)} if len(lat) else None}


def run_loop(runner: Runner, items: Iterator[Item], refresh_every: int, draw: Any,
             limit: int | None = None, bar: Any = None, ahead: int = 0, clip_workers: int = 1,
             behind: bool = False, stopped: Callable[[], bool] = lambda: False) -> Report:
    """Predict every item in order: CLIP on items 0, K, 2K, ... (K = ``refresh_every``), SalMM
    on all; ``draw(item, saliency, status)`` gets each prediction [h, w] and the run so far
    (``status``: "12.3 fps, 45 ms", the frames per second and the median latency of the last
    30 frames; "" for the first frame). The loop ends after ``limit`` items, when ``stopped()``
    says so (asked before each item), or on Ctrl-C (logged), with the frames done so far.

    ``ahead`` > 0 (a file or a folder, whose later frames are already there): CLIP runs in
    ``clip_workers`` threads of its own, on each refreshed item as soon as it is read, up to
    ``ahead`` items before the one being predicted, so SalMM rarely waits for it (and at K = 1
    several frames are embedded at once); 0 (a live source): CLIP runs in the loop. ``behind``:
    drawing runs in a thread of its own, at most :data:`DRAWN_BEHIND` frames behind SalMM, in
    order. The predictions are the same either way: each item's embedding is CLIP's of the
    same refreshed item. A frame's latency runs from the loop taking it to its overlay drawn
    (CLIP included when the loop waited for it)."""
    latency: list[float] = []
    clip_frames, status, embedding = 0, "", None
    items = items if limit is None else itertools.islice(items, limit)
    clip = ThreadPoolExecutor(clip_workers, thread_name_prefix="clip") if ahead > 0 else None
    start = time.perf_counter()

    def finish(frame: tuple[int, Item, np.ndarray, float]) -> None:
        nonlocal status
        number, item, saliency, taken = frame
        draw(item, saliency, status)
        done = time.perf_counter()
        latency.append(1e3 * (done - taken))
        status = f"{(number + 1) / (done - start):.1f} fps, {np.median(latency[-30:]):.0f} ms"
        if bar is not None:
            bar.update(1)
            if number % 10 == 9:
                bar.set_postfix(fps=f"{(number + 1) / (done - start):.1f}",
                                ms=f"{np.median(latency[-30:]):.0f}")

    drawing = Sink(finish, DRAWN_BEHIND) if behind else None
    refreshed = _refreshed(items, refresh_every, ahead, clip, runner)
    try:
        with drawing or contextlib.nullcontext():
            for number, item, future in refreshed:
                if stopped():
                    break
                taken = time.perf_counter()
                if future is not None:
                    embedding = future.result()
                    clip_frames += 1
                elif number % refresh_every == 0:
                    embedding = runner.embed(item.model_input)
                    clip_frames += 1
                frame = (number, item, runner.saliency(item.model_input, embedding), taken)
                if drawing is not None:
                    drawing.put(frame)
                else:
                    finish(frame)
    except KeyboardInterrupt:
        log.info("stopped (Ctrl-C) after %d frames", len(latency))
    finally:
        refreshed.close()                                   # the source's reading stops now
        if clip is not None:
            clip.shutdown(wait=True, cancel_futures=True)   # at most the CLIP calls under way
    return Report(latency, time.perf_counter() - start, clip_frames)


def _refreshed(items: Iterable[Item], refresh_every: int, ahead: int,
               clip: ThreadPoolExecutor | None, runner: Runner
               ) -> Iterator[tuple[int, Item, Future | None]]:
    """(number, item, CLIP's embedding of it under way or None) in order, each item read up to
    ``ahead`` items before it is handed out and, when its number is a multiple of
    ``refresh_every``, given to ``clip`` as it is read. A failure to read an item re-raises
    after the items read before it are handed out, as without reading ahead."""
    window: deque[tuple[int, Item, Future | None]] = deque()
    try:
        for number, item in enumerate(items):
            refresh = clip is not None and number % refresh_every == 0
            window.append((number, item,
                           clip.submit(runner.embed, item.model_input) if refresh else None))
            if len(window) > ahead:
                yield window.popleft()
    except Exception:
        while window:
            yield window.popleft()
        raise
    yield from window


RANDOM_CAVEAT = overlay.caveat(synthetic=False, random_clip=True)
"""The banner of a stream whose CLIP has random weights."""


class Display:
    """Where overlays go: the ``--out`` video and the ``--show`` window."""

    def __init__(self, opts: StreamOptions, fps: float | None, caveat: str = "") -> None:
        self.opts, self.caveat = opts, caveat
        self.video = overlay.VideoWriter(opts.out, opts.fps or fps or STREAM_FPS,
                                         preset=ENCODER_PRESET) \
            if opts.out else None
        if opts.show:
            try:
                cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
            except cv2.error:
                raise BadInputError("--show", "no window can be opened here (no display, or"
                                    " OpenCV without GUI support: opencv-python-headless);"
                                    " use --out") from None
        self.stopped = False

    def __call__(self, item: Item, saliency: np.ndarray, status: str) -> None:
        shown = overlay.overlay(overlay.binned_to_width(item.frame, DISPLAY_WIDTH), saliency,
                                colormap=self.opts.colormap, alpha=self.opts.alpha)
        shown = overlay.stamp(shown, status or "starting", corner="top-right")
        if self.caveat:
            shown = overlay.banner(shown, self.caveat)
        if self.video is not None:
            self.video.write(shown)
        if self.opts.show:
            cv2.imshow(WINDOW, cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                self.stopped = True

    def finish(self, completed: bool) -> None:
        if self.video is not None:
            if completed and self.video.frames:
                self.video.close()
            else:
                self.video.abort()
        if self.opts.show:
            cv2.destroyWindow(WINDOW)


def onnx_folder(opts: StreamOptions, loaded: LoadedModel, size: tuple[int, int]) -> Path:
    """The export the onnx backend runs: ``--onnx DIR`` checked against the checkpoint, else
    one made once under :data:`EXPORT_CACHE` (keyed by checkpoint, size and CLIP weights)."""
    if opts.onnx is not None:
        checked_export(opts.onnx, loaded, size, int8=opts.clip_int8)
        return Path(opts.onnx)
    if opts.clip_int8:
        raise BadInputError("--clip-int8", "needs --onnx DIR, an export made with salmm export"
                            " --clip-int8 VIDEO|DIR (its int8 CLIP is measured on your frames)")
    key = f"{loaded.info['sha256'][:16]}-{size[1]}x{size[0]}"
    folder = EXPORT_CACHE / key
    try:
        checked_export(folder, loaded, size)
    except BadInputError:
        log.info("exporting the checkpoint for onnxruntime (once) into %s", folder)
        export(ExportOptions(checkpoint=opts.checkpoint, out=str(folder), size=size,
                             clip=opts.clip))
    return folder


def stream(opts: StreamOptions) -> dict[str, Any]:
    """Run ``opts``; returns the summary (also logged; ``<out>.json`` beside ``--out``)."""
    if opts.backend == "onnx" and opts.device not in (None, "cpu"):
        raise BadInputError("--device", "the onnx backend runs on the CPU")
    if opts.clip_int8 and opts.backend != "onnx":
        raise BadInputError("--clip-int8", "runs the export's int8 CLIP graph: use --backend onnx")
    loaded = load_model(opts.checkpoint, inline_clip=False, given_clip=dict(opts.clip),
                        device="cpu" if opts.backend == "onnx" else opts.device, amp=opts.amp)
    size = opts.size or loaded.size
    if size[0] % 32 or size[1] % 32:
        raise BadInputError(opts.input, f"frames would be fed at {size[1]}x{size[0]}; SalMM needs"
                            " width and height that are multiples of 32 (see --size)")
    source = open_source(opts, size)
    # a file or folder: CLIP reads ahead in threads of its own, one a core, overlays are drawn
    # behind, and the stages, not the operators, share the cores (one intra-op thread each
    # unless --threads); a live source (camera, stdin) cannot be read ahead and wants the
    # lowest latency: CLIP and drawing run in the loop, on the governor's threads unless
    # --threads
    workers = min(usable_cores(), CLIP_WORKERS)
    ahead = 0 if source.live is not None or opts.input == "-" else \
        max(opts.refresh_every, workers)
    with (intra_op_threads(opts.threads or 1) if ahead or opts.threads
          else contextlib.nullcontext()):
        runner: Runner = (OnnxRunner(onnx_folder(opts, loaded, size), torch.get_num_threads(),
                                     loaded, size, int8=opts.clip_int8)
                          if opts.backend == "onnx" else TorchRunner(loaded))
        display = Display(opts, source.fps,
                          RANDOM_CAVEAT if loaded.clip.pretrained is None else "")
        completed = False
        total = source.total if opts.limit is None or source.total is None \
            else min(source.total, opts.limit)
        items = source.items if source.live is not None else prefetch(source.items, 2)
        try:
            with progress(total=total, unit="frame", desc="stream") as bar:
                report = run_loop(runner, items, opts.refresh_every, display, opts.limit, bar,
                                  ahead=ahead, clip_workers=workers,
                                  behind=bool(ahead) and not opts.show,
                                  stopped=lambda: display.stopped)
            completed = True
        finally:
            display.finish(completed)
    report.dropped = source.live.dropped if source.live is not None else 0
    summary = {"input": opts.input, "backend": opts.backend,
               "salmm_engine": getattr(runner, "engine", "torch"), "clip_int8": opts.clip_int8,
               "refresh_every": opts.refresh_every,
               "size": {"height": size[0], "width": size[1]}, **report.summary(),
               "checkpoint": loaded.info["sha256"],
               "out": opts.out if report.latency_ms else None}
    if not summary["frames"]:
        log.warning("no frames were predicted")
        return summary
    lat = summary["latency_ms"]
    log.info("%d frames at %.1f fps sustained; latency p50 %.1f ms, p95 %.1f ms, max %.1f ms;"
             " CLIP on %d frames%s%s", summary["frames"], summary["fps"], lat["p50"], lat["p95"],
             lat["max"], summary["clip_frames"],
             f"; {report.dropped} live frames dropped" if report.dropped else "",
             f"; wrote {opts.out}" if opts.out else "")
    if summary["out"]:
        out = Path(opts.out)
        Folder(out.parent).write_bytes(out.name + ".json",
                                       (json.dumps(summary, indent=1) + "\n").encode())
    return summary
