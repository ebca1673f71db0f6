"""Per-core speed of normalize's per-frame work against the published loader's per-sample work.

Run: ``python -m bench.prepare [--frames 40] [--repeats 3] [--fixdata-cells 4680] [--cluster]``

Both sides run in this one process, single-threaded (``cv2.setNumThreads(1)``), on the same
synthetic 1280x720 frames written by ``pipeline.synth``, and the figure is frames per second on
one core:

* **published loader** — what the SalM² training loader does for every sample, every epoch:
  ``imageio.imread`` + ``cv2.resize(INTER_CUBIC)`` of the frame, and the label: TrafficGaze:
  load the video's whole ``fixdata`` .mat, paint the fixations, 720x1280
  ``gaussian_filter(sigma=40)``, cubic resize, min-max (``labels.fixation_label_reference``);
  BDDA: ``cv2.imread(gray)`` + cubic resize + /255.
* **baseline** (the ratios' denominator) — the straightforward per-frame normalize: the
  published loader's work, then the same JPEG / 16-bit PNG encoders as normalize.
* **normalize** — ``pipeline.normalize.frames.prepare_frame``: sha256 of the raw files, decode, cubic
  resize, fast label, JPEG + 16-bit PNG + npy + json encoding of the sample. (Reading the
  fixdata file is done once per video when planning, not per frame.)
* **every later epoch** — decoding one prepared sample (256x256 JPEG + 16-bit PNG label), which
  is what training does per sample once the data is prepared.
* **normalize --profile fast** — the same with the JPEG decoder downscaling (DCT scaling), with
  its mean / max absolute pixel error against the faithful path on the prepared 256x256 frame
  (and label, for BDDA), in grey levels.

``--fixdata-cells``: real TrafficGaze fixdata files hold one cell per frame of the video
(74,870 frames over 16 videos: ~4,680 cells each); the synthetic ones are padded to that many
cells so the baseline's per-sample ``loadmat`` costs what it costs on the real files.
``--cluster`` also times a whole ``normalize`` run on a started local Dask cluster (all cores).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per side, as Dask's single-threaded workers do

import argparse
import importlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import imageio.v2 as imageio
import numpy as np

from pipeline import synth
from pipeline.core.dask_cluster import dask_client
from pipeline.datasets import read_frames
from pipeline.datasets.matfile import load_fixdata, write_fixdata
from pipeline.datasets.readers import fixation_points
from pipeline.formats import labels
from pipeline.formats.shards import decode_frame, decode_label, encode_png
from pipeline.normalize import Options, normalize
from pipeline.normalize.frames import prepare_frame

log = logging.getLogger("bench.prepare")
SIZE = (256, 256)


def loader_trafficgaze(frame) -> tuple[np.ndarray, np.ndarray]:
    """The published loader's per-sample work for a TrafficGaze frame: uint8 [256, 256, 3]
    resized frame, float32 [256, 256] label."""
    image = imageio.imread(frame.image_path)
    image = cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_CUBIC)
    cells = load_fixdata(frame.image_path.parents[2] / "fixdata" / f"fixdata{frame.video}.mat")
    points, _ = fixation_points(cells[frame.frame - 1])
    return image, labels.fixation_label_reference(labels.loader_points(points), SIZE)


def loader_bdda(frame) -> tuple[np.ndarray, np.ndarray]:
    """The published loader's per-sample work for a BDDA frame (same outputs)."""
    image = imageio.imread(frame.image_path)
    image = cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_CUBIC)
    gray = cv2.imread(str(frame.gaze_map_path), cv2.IMREAD_GRAYSCALE)
    gray = cv2.resize(gray, SIZE[::-1], interpolation=cv2.INTER_CUBIC)
    return image, gray.astype(np.float32) / 255


def straightforward(loader):
    """The straightforward per-frame normalize: the loader's work, then the same frame encoder."""
    def work(frame) -> tuple[bytes, np.ndarray]:
        image, label = loader(frame)
        return encode_png(image), label
    return work


def frames_per_s(works: dict, items: dict, repeats: int) -> dict[str, float]:
    """{name: median frames/s} of ``works[name](item)`` over ``items[name]``, one warm-up each.

    The variants take turns within every repeat, so a change in machine load hits them alike.
    """
    for name, work in works.items():
        work(items[name][0])
    rates: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            start = time.perf_counter()
            for item in items[name]:
                work(item)
            rates[name].append(len(items[name]) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def read_prepared(sample) -> tuple[np.ndarray, np.ndarray]:
    """What training does per sample once the data is prepared: decode the 256x256 frame and
    make its label."""
    return decode_frame(sample, SIZE).astype(np.float32) / 255, decode_label(sample, SIZE)


def pixel_error(frames, root: Path) -> dict[str, tuple[float, float]]:
    """Mean / max |fast - faithful| in grey levels of the prepared frames (and labels)."""
    errors: dict[str, list[np.ndarray]] = {"frame": [], "label": []}
    for frame in frames:
        faithful = prepare_frame(frame, root, Options(SIZE)).sample
        fast = prepare_frame(frame, root, Options(SIZE, decode="fast")).sample
        errors["frame"].append(np.abs(decode_frame(faithful, SIZE).astype(np.float64)
                                      - decode_frame(fast, SIZE)))
        errors["label"].append(np.abs(decode_label(faithful, SIZE)
                                      - decode_label(fast, SIZE)) * 255)
    return {k: (float(np.mean(v)), float(np.max(v))) for k, v in errors.items()}


def pad_fixdata(root: Path, cells: int) -> None:
    """Pad every fixdata file of a synthetic root with empty cells up to ``cells`` cells."""
    for path in sorted((root / "fixdata").glob("fixdata*.mat")):
        existing = load_fixdata(path)
        write_fixdata(path, list(existing) + [np.zeros((0, 4))] * max(0, cells - len(existing)))


def bench_dataset(dataset: str, root: Path, args: argparse.Namespace) -> None:
    frames = [f for split in ("train", "valid", "test") if (root / f"{split}.json").exists()
              for f in read_frames(dataset, root, split)][: args.frames]
    loader = loader_bdda if dataset == "bdda" else loader_trafficgaze
    error = pixel_error(frames[: min(10, len(frames))], root)
    prepared = [prepare_frame(f, root, Options(SIZE)).sample for f in frames]
    rate = frames_per_s({
        "loader": loader,
        "baseline": straightforward(loader),
        "faithful": lambda f: prepare_frame(f, root, Options(SIZE)),
        "fast": lambda f: prepare_frame(f, root, Options(SIZE, decode="fast")),
        "read": read_prepared,
    }, {"loader": frames, "baseline": frames, "faithful": frames, "fast": frames,
        "read": prepared}, args.repeats)
    log.info("%s, %d frames of 1280x720, one core:", dataset, len(frames))
    log.info("  published loader, per sample per epoch   %7.1f frames/s", rate["loader"])
    log.info("  baseline: loader work + encoding         %7.1f frames/s    1.0x", rate["baseline"])
    log.info("  normalize (faithful)                     %7.1f frames/s   %5.1fx", rate["faithful"],
             rate["faithful"] / rate["baseline"])
    log.info("  normalize --profile fast                 %7.1f frames/s   %5.1fx   vs faithful:"
             " frame mean %.2f max %.0f grey levels; label mean %.3f max %.2f (x255)",
             rate["fast"], rate["fast"] / rate["baseline"], *error["frame"],
             *error["label"])
    log.info("  later epochs: decode a prepared sample   %7.1f frames/s   (%.1fx the loader)",
             rate["read"], rate["read"] / rate["loader"])


def bench_cluster(dataset: str, root: Path, work: Path) -> None:
    """Frames/s of the whole normalize run on a started local cluster (one worker per core)."""
    with dask_client() as client:
        workers = len(client.nthreads())
        client.run(lambda: importlib.import_module("pipeline.normalize") and None)  # warm-up
        start = time.perf_counter()
        result = normalize(dataset, root, str(work / f"{dataset}-prepared"), shard_size=64,
                           dask_address=client.scheduler.address, progress=False)
        elapsed = time.perf_counter() - start
    total = sum(result["samples"].values())
    log.info("  whole normalize run on a local Dask cluster of %d workers: %d frames in %.1f s ="
             " %.1f frames/s (planning, hashing and writing included)", workers, total, elapsed,
             total / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames per dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fixdata-cells", type=int, default=4680,
                        help="pad fixdata files to this many cells (real: ~4680 per video)")
    parser.add_argument("--cluster", action="store_true",
                        help="also time the whole normalize command on a local Dask cluster")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("pipeline", "distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for dataset in ("trafficgaze", "bdda"):
            per_video = max(8, -(-args.frames // 2))
            root = synth.write_dataset(dataset, work / dataset, videos=2, frames=per_video + 5)
            if dataset != "bdda":
                pad_fixdata(root, args.fixdata_cells)
            bench_dataset(dataset, root, args)
            if args.cluster:
                bench_cluster(dataset, root, work)
        log.info("goal: >= 10x on TrafficGaze-format input, >= 1.5x on BDDA-format input")


if __name__ == "__main__":
    main()
