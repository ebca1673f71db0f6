"""A rehearsal of the whole path at the real datasets' sizes, on SYNTHETIC data.

Run: ``python -m bench.scale [--points 1000,10000,100000] [--reference ../shared/reference]
[--work DIR] [--parts normalize,cache,evaluate]``

Everything here is synthetic: a few hundred generated 1280x720 frames and gaze maps
(``pipeline.synth``), hard-linked into the BDDA download layout at the real split sizes - split
counts in BDDA's proportions (train 286,251 : valid 63,036 : test 93,260), valid and test
entries taken from the reference split lists, train entries of the same form. The numbers say
how the code scales, not what the real data looks like.

* **per-frame work** of normalize on one core, glibc's default allocator against the reuse of
  freed memory normalize's workers use (:func:`pipeline.core.cpu.reuse_freed_memory`): frames/s,
  kernel share of the CPU time, minor page faults a frame, and whether the samples' bytes are
  identical. Goal: kernel time <= 10%, frames/s >= 1.2x.
* **normalize + verify** at each ``--points`` count of frames: wall time, frames/s, CPU time in
  the kernel, minor page faults per frame, peak resident memory of the main process and of the
  largest Dask worker, manifest size. Goals: frames/s at the largest point >= 0.9 of that at
  the one before (time linear in frames), peak memory <= 1.2 x (memory flat).
* **cache**: a CLIP cache of BDDA-train size (286,251 x 2 x 512 float32) written through
  :class:`pipeline.formats.clip_cache.CacheWriter` (random embeddings: CLIP cannot embed that many here),
  and the trainer's loader over it - resident memory each data worker adds and samples/s -
  against a 1,000-sample cache, and against the whole-split lookup the loader used before (side
  by side in this run). Goal: <= 100 MB per worker at 286,251 samples, samples/s >= 0.95.
* **evaluate**: all six metrics on TrafficGaze-format data (random weights), frames/s, and the
  full TrafficGaze test split (19,135 frames) projected from it. Goal: < 30 min on 2 cores.

The last line sums it up: ``scale: time ratio R (frames/s big/small), memory ratio M (peak
big/small), worker +W MB at 286251 samples``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from pipeline.core.fsio import Folder
from pipeline.formats.clip_cache import CacheWriter, open_cache
from pipeline.formats.manifest import write_manifest
from pipeline.formats.shards import encode_sample, sample_key, write_shard
from salmm.model.net import SalMM
from salmm.model.official import save_official

REPO = Path(__file__).resolve().parents[1]
REAL = {"train": 286251, "valid": 63036, "test": 93260}
"""BDDA's split sizes (the reference lists give valid and test; train.json is not shipped)."""
TRAFFICGAZE_TEST = 19135
UNIQUE_VIDEOS, UNIQUE_FRAMES = 4, 60
log = logging.getLogger("bench.scale")


def module(*args: str, env: dict[str, str] | None = None) -> None:
    """``python -m ARGS`` from the repository; raises with its stderr on failure."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                            text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")


# ---- raw data at real counts -------------------------------------------------------------------


def unique_pool(work: Path) -> tuple[list[Path], list[Path]]:
    """The few hundred generated (camera frame, gaze map) files every larger root links to."""
    pool = work / "pool"
    if not pool.exists():
        module("pipeline", "-q", "synth", "--dataset", "bdda", "--out", str(pool),
               "--videos", str(UNIQUE_VIDEOS), "--frames", str(UNIQUE_FRAMES))
    frames = sorted((pool / "camera_frames").rglob("*.jpg"))
    return frames, [pool / "gazemap_frames" / f.relative_to(pool / "camera_frames")
                    for f in frames]


def split_names(reference: Path, total: int) -> dict[str, list[str]]:
    """``total`` split entries in BDDA's proportions: valid and test from the reference lists,
    train of the same form on video numbers the reference lists do not use."""
    counts = {s: round(total * n / sum(REAL.values())) for s, n in REAL.items()}
    names = {}
    for split in ("valid", "test"):
        lines = (reference / "BDDA" / f"{split}.json").read_text().splitlines()
        names[split] = [json.loads(line) for line in lines if line.strip()][:counts[split]]
    used = {name.split("/")[0] for split in names.values() for name in split}
    free = (f"{v:04d}" for v in range(1, 10000) if f"{v:04d}" not in used)
    train: list[str] = []
    while len(train) < counts["train"]:
        video = next(free)
        train += [f"{video}/{f:04d}.jpg" for f in range(4, 4 + min(300, counts["train"]
                                                                    - len(train)))]
    names["train"] = train
    return names


def linked_root(work: Path, reference: Path, total: int) -> Path:
    """A BDDA root of ``total`` listed frames, every file a hard link into the pool."""
    root = work / f"raw-{total}"
    if (root / "train.json").exists():
        return root
    frames, maps = unique_pool(work)
    names = split_names(reference, total)
    i = 0
    for split, entries in names.items():
        for name in entries:
            for folder, source in (("camera_frames", frames), ("gazemap_frames", maps)):
                target = root / folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source[i % len(source)], target)
            i += 1
        (root / f"{split}.json").write_text("".join(json.dumps(n) + "\n" for n in entries))
    return root


# ---- measuring a command -----------------------------------------------------------------------


@dataclass
class Measured:
    """What one command cost: wall seconds, CPU seconds in user and kernel mode and minor page
    faults of it and everything it started, and the peak resident memory (bytes) of the command
    itself and of its largest child (a Dask worker)."""

    wall: float
    user: float
    system: float
    faults: int
    main_peak: int
    child_peak: int


def measured(*args: str) -> Measured:
    """Run ``python -m ARGS`` and measure it (resident memory sampled every 0.2 s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = psutil.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    peaks = {"main": 0, "child": 0}

    def sample() -> None:
        while process.poll() is None:
            try:
                peaks["main"] = max(peaks["main"], process.memory_info().rss)
                for child in process.children(recursive=True):
                    peaks["child"] = max(peaks["child"], child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    watcher.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{stderr.decode()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Measured(wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                    after.ru_minflt - before.ru_minflt, peaks["main"], peaks["child"])


def mb(value: float) -> str:
    return f"{value / 2**20:.0f} MB"


# ---- the parts ---------------------------------------------------------------------------------


def normalize_points(work: Path, reference: Path, points: list[int]) -> list[dict]:
    """normalize + verify at each point; one result row each."""
    rows = []
    for total in points:
        root = linked_root(work, reference, total)
        out = work / f"prepared-{total}"
        shutil.rmtree(out, ignore_errors=True)
        run = measured("pipeline", "-q", "normalize", "--dataset", "bdda", "--root", str(root),
                       "--out", str(out))
        check = measured("pipeline", "-q", "verify", str(out))
        rows.append({"frames": total, "wall": run.wall, "fps": total / run.wall,
                     "system": run.system / (run.user + run.system),
                     "faults": run.faults / total, "main": run.main_peak,
                     "worker": run.child_peak, "verify": check.wall,
                     "manifest": (out / "manifest.json").stat().st_size})
        log.info("normalize %d frames: %.0f s, %.1f frames/s, %.0f%% kernel time, %.0f minor"
                 " faults a frame, peak %s main / %s worker; verify %.1f s; manifest %s",
                 total, run.wall, total / run.wall, 100 * rows[-1]["system"],
                 rows[-1]["faults"], mb(run.main_peak), mb(run.child_peak), check.wall,
                 mb(rows[-1]["manifest"]))
        if total != points[-1]:
            shutil.rmtree(out, ignore_errors=True)
    return rows


FRAME_WORK = r"""
import hashlib, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pipeline.core.cpu import reuse_freed_memory
from pipeline.datasets import read_frames
from pipeline.normalize.frames import prepare_frame
from pipeline.normalize.settings import Options
root, reuse = Path(sys.argv[1]), sys.argv[2] == "1"
if reuse:
    reuse_freed_memory()
frames = [f for split in ("train", "valid", "test") for f in read_frames("bdda", root, split)]
digest, options = hashlib.sha256(), Options()
def work(frames):                          # in a pool thread, as a Dask worker runs its tasks
    for frame in frames:
        sample = prepare_frame(frame, root, options).sample
        for field in sorted(sample):
            value = sample[field]
            digest.update(value if isinstance(value, bytes) else value.encode())
with ThreadPoolExecutor(1) as pool:
    pool.submit(prepare_frame, frames[0], root, options).result()     # warm up
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    pool.submit(work, frames).result()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(len(frames) / wall, (after.ru_stime - before.ru_stime) / (after.ru_utime - before.ru_utime
      + after.ru_stime - before.ru_stime), (after.ru_minflt - before.ru_minflt) / len(frames),
      digest.hexdigest())
"""


def frame_work(work: Path, reference: Path, total: int = 600) -> dict:
    """normalize's per-frame work on one core, in a pool thread of two fresh interpreters set up
    as a Dask worker is (``MALLOC_TRIM_THRESHOLD_`` from Dask's ``pre-spawn-environ``: freed
    memory goes back to the kernel at once): as they are, and with
    :func:`pipeline.core.cpu.reuse_freed_memory`, which normalize's tasks call."""
    import dask
    import distributed  # noqa: F401 - its defaults go into dask.config on import

    root = linked_root(work, reference, total)
    environ = {**os.environ, **{k: str(v) for k, v in
                                dask.config.get("distributed.nanny.pre-spawn-environ").items()}}
    out = {}
    for name, flag in (("as Dask sets it", "0"), ("freed memory reused", "1")):
        result = subprocess.run([sys.executable, "-c", FRAME_WORK, str(root), flag], cwd=REPO,
                                capture_output=True, text=True, check=True, env=environ)
        rate, system, faults, digest = result.stdout.split()
        out[name] = {"rate": float(rate), "system": float(system), "faults": float(faults),
                     "digest": digest}
        log.info("per-frame work, %s: %.1f frames/s on one core, %.0f%% kernel time, %.0f"
                 " minor faults a frame", name, float(rate), 100 * float(system), float(faults))
    return out


def cached_prepared(work: Path, samples: int, shard_size: int = 1000) -> tuple[Path, Path]:
    """A prepared dataset of ``samples`` train samples and its CLIP cache, cheaply: one real
    shard of 256x256 samples hard-linked as every shard, and random embeddings written through
    the cache writer chunk by chunk (rows in shard order, keys as the shards hold them)."""
    root = work / f"cached-{samples}"
    if (root / "cache.zarr").exists():
        return root, root / "cache.zarr"
    folder = Folder(root)
    rng = np.random.default_rng(0)
    base = [encode_sample(sample_key(1, i + 1),
                          np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                                  np.ones((32, 32, 1), np.uint8)),
                          np.zeros((0, 2)), {"i": i},
                          gaze=rng.integers(0, 256, (256, 256), dtype=np.uint8))
            for i in range(shard_size)]
    first = write_shard(folder, "train-000000.tar", base)
    shards = [first.manifest_entry()]
    for index in range(1, -(-samples // shard_size)):
        name = f"train-{index:06d}.tar"
        os.link(root / first.name, root / name)
        shards.append({**first.manifest_entry(), "name": name})
    shards[-1]["samples"] = samples - shard_size * (len(shards) - 1)
    if shards[-1]["samples"] != shard_size:          # a short last shard: its own file
        del_name = shards[-1]["name"]
        (root / del_name).unlink()
        shards[-1] = write_shard(folder, del_name, base[:shards[-1]["samples"]]).manifest_entry()
    manifest = {"format": "salmm-prepared", "format_version": 2, "dataset": "bdda",
                "options": {"size": {"height": 256, "width": 256}},
                "splits": {"train": {"samples": samples, "shards": shards}}}
    write_manifest(folder, manifest)
    keys = [s["__key__"] for s in base]
    writer = CacheWriter.open(root / "cache.zarr", {
        "encoder": {"model": "ViT-B-32", "weights": "random-bench", "profile": "salmm",
                    "activation": "quickgelu", "open_clip": "bench", "embed_dim": 512},
        "dtype": "float32", "compute": {"device": "cpu", "autocast": "fp32"},
        "prepared": {"version_id": "bench", "manifest_sha256": "bench"},
        "software": {"torch": "bench", "open_clip": "bench"},
        "splits": {"train": samples}, "chunk_size": 256})
    for chunk in writer.missing_chunks("train"):
        start, stop = writer.chunk_range("train", chunk)
        rows = [keys[i % shard_size] for i in range(start, stop)]
        writer.write_chunk("train", chunk, rows,
                           rng.standard_normal((stop - start, 2, 512), dtype=np.float32))
    writer.finish()
    return root, root / "cache.zarr"


class WholeSplitTable:
    """The lookup the loader used before: the whole split read into one array and a dict of
    keys, in every worker (the reference the chunked :class:`salmm.data.stages.EmbeddingTable` is
    measured against)."""

    def __init__(self, cache_path: str, split: str) -> None:
        self.cache_path, self.split = cache_path, split
        self._rows: dict[str, int] | None = None
        self._emb: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {"cache_path": self.cache_path, "split": self.split, "_rows": None, "_emb": None}

    def lookup(self, row: int, key: str, flipped: bool) -> np.ndarray:
        if self._rows is None:
            keys, self._emb = open_cache(self.cache_path).load_split(self.split)
            self._rows = {k: i for i, k in enumerate(keys)}
        return self._emb[row, int(flipped)]


class NoTable:
    """No lookup at all (one constant embedding): the loader's memory without the embeddings,
    what the tables' own cost is measured against."""

    def __init__(self, cache_path: str, split: str) -> None:
        self.embedding = np.zeros(512, np.float32)

    def lookup(self, row: int, key: str, flipped: bool) -> np.ndarray:
        return self.embedding


LOADER = r"""
import json, sys, time
import psutil
from bench.scale import NoTable, WholeSplitTable
from salmm.data.stages import EmbeddingTable, SaliencyShards, make_loader
from pipeline.formats.manifest import read_manifest
from pipeline.formats.shards import split_shards
root, cache, kind, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = SaliencyShards(split_shards(root, read_manifest(root), "train"), split="train", train=True,
                      seed=0, batch_size=32, size=(256, 256), cache_path=cache)
tables = {"chunked": EmbeddingTable, "whole split": WholeSplitTable, "none": NoTable}
data.table = tables[kind](cache, "train")
it = iter(make_loader(data, 2, pin_memory=False))
next(it)                                         # workers started and warm
me, n, uss, rss = psutil.Process(), 0, 0, 0
start = time.perf_counter()
for i, batch in enumerate(it):
    n += len(batch["key"])
    if i % 20 == 0 or i + 1 == batches:
        for child in me.children():
            info = child.memory_full_info()
            uss, rss = max(uss, info.uss), max(rss, info.rss)
    if i + 1 >= batches:
        break
print(json.dumps({"rate": n / (time.perf_counter() - start), "uss": uss, "rss": rss}))
"""


def loader_run(root: Path, cache: Path, kind: str, batches: int) -> dict:
    """samples/s of the trainer's loader (2 workers, batches of 32, shuffled) over ``batches``
    batches, and the largest data worker's memory - ``uss``, what it holds alone, and ``rss`` -
    in a fresh interpreter (``kind``: "chunked" or "whole split" lookup)."""
    result = subprocess.run([sys.executable, "-c", LOADER, str(root), str(cache), kind,
                             str(batches)], check=False, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"the loader run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cache_part(work: Path, batches: int) -> dict:
    """Loader memory and speed at BDDA-train size and at 1,000 samples, for the chunked lookup,
    the whole-split one and none at all: a table's own cost is its worker's memory less the
    no-table worker's at the same size (the shuffle buffer and the decoded samples are the
    same); "over 1000" is the growth from the small cache, which also holds the buffer's fill."""
    big, big_cache = cached_prepared(work, REAL["train"])
    small, small_cache = cached_prepared(work, 1000)
    runs = {kind: (loader_run(big, big_cache, kind, batches),
                   loader_run(small, small_cache, kind, batches))
            for kind in ("none", "chunked", "whole split")}
    base = runs["none"][0]["uss"]
    out = {}
    for kind, (at_big, at_small) in runs.items():
        out[kind] = {"rate": at_big["rate"], "peak": at_big["uss"], "table": at_big["uss"] - base,
                     "small_rate": at_small["rate"], "small_peak": at_small["uss"],
                     "added": at_big["uss"] - at_small["uss"]}
        log.info("loader, %s lookup: %.0f samples/s, worker holds %s (resident %s; the table"
                 " %s) at %d samples; %.0f samples/s, %s at 1000 (+%s)", kind, at_big["rate"],
                 mb(at_big["uss"]), mb(at_big["rss"]), mb(out[kind]["table"]), REAL["train"],
                 at_small["rate"], mb(at_small["uss"]), mb(out[kind]["added"]))
    return out


def evaluate_part(work: Path, frames: tuple[int, int]) -> dict:
    """evaluate on TrafficGaze-format data (random weights, all six metrics, one metric worker
    per core) at two test-split sizes: the cost of a frame from their difference, the fixed cost
    (start-up) from the intercept, and the full TrafficGaze test split projected from both."""
    torch.manual_seed(0)
    checkpoint = work / "model_best_salmm_TrafficGaze_256x256.tar"
    save_official(checkpoint, SalMM(backend="builtin"), epoch=1, valid_loss=0.0)
    walls = []
    for count in frames:
        raw, prepared = work / f"tg-raw-{count}", work / f"tg-prepared-{count}"
        module("pipeline", "-q", "synth", "--dataset", "trafficgaze", "--out", str(raw),
               "--videos", "3", "--frames", str(count + 5))
        module("pipeline", "-q", "normalize", "--dataset", "trafficgaze", "--root", str(raw),
               "--out", str(prepared))
        module("pipeline", "-q", "embed", "--prepared", str(prepared), "--split", "test",
               "--clip-pretrained", "none")
        run = measured("salmm.evaluate", "--checkpoint", str(checkpoint), "--prepared",
                       str(prepared), "--split", "test", "--out", str(work / f"tg-eval-{count}"),
                       "--cached-clip", "--clip-pretrained", "none")
        summary = json.loads((work / f"tg-eval-{count}" / "summary.json").read_text())
        walls.append((summary["n_frames"], run.wall))
        log.info("evaluate %d TrafficGaze-format frames, all six metrics: %.1f s",
                 summary["n_frames"], run.wall)
    (n1, t1), (n2, t2) = walls
    per_frame = (t2 - t1) / (n2 - n1)
    fixed = t1 - n1 * per_frame
    projected = fixed + TRAFFICGAZE_TEST * per_frame
    log.info("evaluate: %.1f frames/s after %.0f s of start-up; the %d-frame test split: %.1f"
             " min", 1 / per_frame, fixed, TRAFFICGAZE_TEST, projected / 60)
    return {"rate": 1 / per_frame, "fixed": fixed, "projected_min": projected / 60}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="1000,10000,100000",
                        help="frame counts of the normalize rehearsal")
    parser.add_argument("--reference", type=Path, default=REPO.parent / "shared" / "reference",
                        help="folder with the reference split lists (BDDA/valid.json, ...)")
    parser.add_argument("--work", type=Path, help="working folder (default: temporary)")
    parser.add_argument("--parts", default="frames,normalize,cache,evaluate")
    parser.add_argument("--batches", type=int, default=150, help="loader batches per run")
    parser.add_argument("--eval-frames", default="40,240",
                        help="two test-split sizes (frames) for evaluate's projection")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    points = [int(p) for p in opts.points.split(",")]
    parts = set(opts.parts.split(","))
    with tempfile.TemporaryDirectory(dir=opts.work) as tmp:
        work = Path(tmp)
        frames = frame_work(work, opts.reference) if "frames" in parts else None
        rows = normalize_points(work, opts.reference, points) if "normalize" in parts else []
        cache = cache_part(work, opts.batches) if "cache" in parts else None
        evaluation = (evaluate_part(work, tuple(int(f) for f in opts.eval_frames.split(",")))
                      if "evaluate" in parts else None)
    print("\nSYNTHETIC data at real counts (bench/scale.py), this machine:")
    if frames:
        for name, f in frames.items():
            print(f"per-frame work ({name:19s}) {f['rate']:6.1f} frames/s on one core, kernel"
                  f" {100 * f['system']:3.0f}%, {f['faults']:5.0f} minor faults/frame")
        old, new = frames["as Dask sets it"], frames["freed memory reused"]
        print(f"per-frame work: {new['rate'] / old['rate']:.2f}x, identical sample bytes:"
              f" {'yes' if new['digest'] == old['digest'] else 'NO'}")
    for row in rows:
        print(f"normalize {row['frames']:>7} frames  {row['wall']:7.0f} s  {row['fps']:6.1f}"
              f" frames/s  kernel {100 * row['system']:3.0f}%  {row['faults']:6.0f} faults/frame"
              f"  peak {mb(row['main'])} main, {mb(row['worker'])} worker  verify"
              f" {row['verify']:.1f} s  manifest {mb(row['manifest'])}")
    if cache:
        for name, c in cache.items():
            print(f"loader ({name:11s}) {c['rate']:6.0f} samples/s, a worker holds"
                  f" {mb(c['peak'])} at {REAL['train']} samples (the table {mb(c['table'])}),"
                  f" +{mb(c['added'])} over 1000")
        print(f"loader samples/s chunked / whole split: "
              f"{cache['chunked']['rate'] / cache['whole split']['rate']:.2f}")
    if evaluation:
        print(f"evaluate {evaluation['rate']:.1f} frames/s after {evaluation['fixed']:.0f} s of"
              f" start-up -> TrafficGaze test ({TRAFFICGAZE_TEST} frames)"
              f" {evaluation['projected_min']:.1f} min (goal < 30)")
    parts_text = []
    if len(rows) >= 2:
        big, small = rows[-1], rows[-2]
        points = f"{big['frames'] // 1000}k/{small['frames'] // 1000}k"
        memory = max(big["worker"] / small["worker"], big["main"] / small["main"])
        parts_text += [f"time ratio {big['fps'] / small['fps']:.2f} (frames/s {points})",
                       (f"memory ratio {memory:.2f} (peak {points}, the larger of main and"
                        " worker)")]
    if cache:
        parts_text.append(f"worker +{cache['chunked']['table'] / 2**20:.0f} MB at"
                          f" {REAL['train']} samples")
    print("scale: " + ", ".join(parts_text))


if __name__ == "__main__":
    main()
