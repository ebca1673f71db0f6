"""``python -m salmm.evaluate``: score a checkpoint on a prepared split with the official metrics.

The run, top to bottom:

1. Inputs, all checked before any frame is scored: the prepared dataset's manifest and split;
   the checkpoint (ours from :mod:`salmm.train`, or an official ``model_best_*.tar``, read by
   :func:`salmm.official.read_official`, which names every wrong key); the CLIP embeddings -
   the cache (``--cached-clip``; made from this dataset version with the checkpoint's CLIP
   model, weights and profile) or the frozen CLIP run inline with the checkpoint's options.
2. The model over the split in shard order, no flip (``frame / 255`` as in training).
3. Per frame, :func:`salmm.evaluation.metrics.evaluate_frame` - CC, SIM, KLD of the prediction against the
   label at the model's resolution; AUC-Borji, AUC-Judd and NSS against the 720x1280 binary map
   of the raw fixation points (TrafficGaze, DrFixD-rainy; BDDA has CC, SIM, KLD only, as the
   official script). This is the slow part (~60 ms a frame at full size), so frames are scored
   in a process pool; each frame's random draws come from its own generator seeded by
   (``--seed``, sample key), so the scores do not depend on the number of workers.
4. Outputs in ``--out`` (each written atomically, ``summary.json`` last): ``per_frame.csv`` (one
   row per frame), ``results.md`` (the paper's column order AUC_B, AUC_J, NSS, CC, SIM, KLD;
   also logged) and ``summary.json`` (the official means - NaN when any frame is NaN - and
   the means over the non-NaN frames, NaN counts, dataset version, checkpoint sha256,
   CLIP cache identity, seed, the CSV's sha256). With ``--export-mat DIR``, ``pre/`` and
   ``tar/`` ``.mat`` files and the ``test.mat`` name list in the layout of the official MATLAB
   scripts (:mod:`salmm.evaluation.matlab_export`; the name list is written last).

Loading the checkpoint with the CLIP it was trained with, and reading the split, is
:mod:`salmm.inference`, shared with ``python -m salmm.predict``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.cpu import usable_cores
from pipeline.core.dask_cluster import dask_client
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.progress import progress
from pipeline.datasets import REGISTRY
from pipeline.encoders.clip import RANDOM_NOTE
from pipeline.formats.labels import matlab_points
from pipeline.formats.manifest import prepared_size, version_id
from salmm.data.stages import EmbeddingTable
from salmm.evaluation import matlab_export, metrics
from salmm.evaluation.baselines import BASELINES, Baseline, fit_baseline
from salmm.inference import (
    MODEL_OPTIONS_NOTE,
    LoadedModel,
    add_model_options,
    batched,
    iter_samples,
    load_model,
    open_eval_cache,
    parse_model_args,
    predict_batch,
    prepared_split,
)
from salmm.options import non_negative_int, positive_int, run_command

log = logging.getLogger("salmm.evaluate")

CSV_NAME = "per_frame.csv"
VIDEO_CSV_NAME = "per_video.csv"
TABLE_NAME = "results.md"
SUMMARY_NAME = "summary.json"
EXPORT_RECORD = "salmm.json"
"""Written into ``--export-mat``: what was exported and where its results are
(``python -m salmm.certify`` reads it)."""
ID_COLUMNS = ("index", "key", "name", "video", "frame")


# ---- scoring -----------------------------------------------------------------------------------


def frame_seed(seed: int, key: str) -> list[int]:
    """Entropy of one frame's generator: the run's seed and 64 bits of sha256 of its key."""
    return [seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")]


SPREAD_METRICS = ("AUC_B", "AUC_J")
"""The metrics with random draws, scored under every seed of ``--seeds``."""


def score_frame(pred: np.ndarray | None, label: np.ndarray, fixations: np.ndarray | None,
                seeds: Sequence[int], key: str, jitter: bool) -> dict[str, Any]:
    """One frame's scores (a pool task): :func:`salmm.evaluation.metrics.evaluate_frame` with the frame's
    own generator for the first seed, and with more than one seed a ``"spread"`` entry: for
    each of :data:`SPREAD_METRICS`, its score under every seed (the first's included). ``pred``
    None is the uniform baseline (:func:`salmm.evaluation.metrics.uniform_scores`)."""
    if pred is None:
        scores: dict[str, Any] = metrics.uniform_scores(label, fixations)
        extra = [scores] * (len(seeds) - 1) if fixations is not None else []
    else:
        rng = np.random.default_rng(frame_seed(seeds[0], key))
        scores = metrics.evaluate_frame(pred, label, fixations, rng=rng, jitter=jitter)
        extra = [metrics.frame_aucs(pred, fixations, jitter=jitter, rng=np.random.default_rng(
            frame_seed(seed, key))) for seed in seeds[1:]] if fixations is not None else []
    if extra:
        scores["spread"] = {m: [scores[m]] + [e[m] for e in extra] for m in SPREAD_METRICS}
    return scores


class FramePool:
    """Scores frames in ``workers`` processes (0: in this process) or, given a Dask ``client``,
    on its cluster (one task a frame); results in submission order; at most four frames per
    worker wait, so memory stays flat."""

    def __init__(self, workers: int, client: Any = None) -> None:
        self.client = client
        if client is not None:
            workers = max(1, sum(client.nthreads().values()))
        self.workers = workers
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                      if workers > 0 and client is None else None)
        self._pending: deque[Any] = deque()

    def submit(self, *args: Any) -> Iterator[dict[str, float]]:
        """Queue one frame; yields the results that are due (oldest first)."""
        if self.client is not None:
            self._pending.append(self.client.submit(score_frame, *args, pure=False))
        elif self._pool is not None:
            self._pending.append(self._pool.submit(score_frame, *args))
        else:
            yield score_frame(*args)
            return
        while len(self._pending) > 4 * self.workers:
            yield self._pending.popleft().result()

    def drain(self) -> Iterator[dict[str, float]]:
        """The remaining results, in order."""
        while self._pending:
            yield self._pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


# ---- outputs -----------------------------------------------------------------------------------


def csv_bytes(rows: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> bytes:
    """The per-frame CSV: :data:`ID_COLUMNS` then the metrics; floats in full precision
    (``repr``, so the file reads back to the very numbers averaged), NaN as ``nan``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*ID_COLUMNS, *metric_names], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: row[k] for k in ID_COLUMNS},
                         **{m: repr(float(row[m])) for m in metric_names}})
    return buf.getvalue().encode()


def table_text(title: str, row_name: str, means: dict[str, float], note: str | None = None,
               undefined: dict[str, int] | None = None,
               defined_means: dict[str, float] | None = None,
               spread: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown: a title line, the ``note`` (when given) as a bold line, and
    :func:`salmm.evaluation.metrics.format_table` of one row - two when some metric is undefined (NaN) on
    some frames (``undefined``: metric -> frames): the official means, NaN as in MATLAB, then
    ``defined_means`` over the frames where each metric is defined, and a line saying how many
    were left out."""
    head = f"{title}\n\n**{note}**" if note else title
    rows = {row_name: means}
    skipped = {m: k for m, k in (undefined or {}).items() if k}
    if skipped and defined_means is not None:
        rows[f"{row_name}, defined frames only"] = defined_means
        head += ("\n\nUndefined on some frames (NaN: e.g. an all-zero label): "
                 + ", ".join(f"{m} on {k}" for m, k in skipped.items())
                 + ". The first row is the official mean (NaN, as MATLAB's); the second leaves"
                 " those frames out.")
    return f"{head}\n\n{metrics.format_table(rows, spread=spread)}\n"


def finite_means(rows: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> dict[str, float]:
    """Per metric, the mean over the frames where it is not NaN (NaN if it is NaN on all)."""
    out = {}
    for m in metric_names:
        values = np.array([r[m] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[m] = float(values.mean()) if values.size else math.nan
    return out


def _jsonable(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class EvalOptions:
    """What ``python -m salmm.evaluate`` was asked to do (``checkpoint`` or ``baseline``)."""

    checkpoint: str | None
    prepared: str
    out: str
    baseline: str | None = None
    seeds: int = 1
    bootstrap: int = 0
    split: str = "test"
    export_mat: str | None = None
    cached_clip: bool = False
    cache: str | None = None
    batch_size: int = 16
    workers: int = 0
    dask_address: str | None = None
    seed: int = 0
    jitter: bool = True
    device: str | None = None
    amp: str = "off"
    clip: tuple[tuple[str, Any], ...] = ()      # given CLIP options (see given_clip_options)


@dataclass
class Inputs:
    """What an evaluation reads, checked: the split's manifest and sample count, its dataset
    (and whether it has fixations), the loaded checkpoint, and the cached embeddings (None
    when CLIP runs inline)."""

    manifest: dict[str, Any]
    frames: int
    dataset: str
    fixations: bool
    loaded: LoadedModel | None
    cache_path: str | None
    cache_identity: dict[str, Any] | None
    table: EmbeddingTable | None
    baseline: Baseline | None = None

    @property
    def version(self) -> str:
        return version_id(self.manifest)

    @property
    def predictor(self) -> str:
        """What is scored, as the tables name it."""
        if self.baseline is not None:
            return self.baseline.label
        return f"SalM2 ({Path(self.loaded.info['path']).name})"


def open_inputs(opts: EvalOptions) -> Inputs:
    """Every input of ``opts``, checked before any frame is scored."""
    manifest, frames = prepared_split(opts.prepared, opts.split)
    dataset = manifest.get("dataset", "unknown")
    fixations = dataset in REGISTRY and REGISTRY[dataset].has_fixations
    if opts.baseline is not None:
        baseline = fit_baseline(opts.baseline, opts.prepared, manifest)
        return Inputs(manifest, frames, dataset, fixations, None, None, None, None, baseline)
    loaded = load_model(opts.checkpoint, inline_clip=not opts.cached_clip,
                        given_clip=dict(opts.clip), device=opts.device, amp=opts.amp)
    size = prepared_size(manifest)
    if size[0] % 32 or size[1] % 32:
        raise BadInputError(opts.prepared, f"prepared at {size[1]}x{size[0]}; SalMM needs"
                            " width and height that are multiples of 32")
    if size != loaded.size:
        log.warning("the checkpoint was trained at %dx%d, the prepared data is %dx%d",
                    loaded.size[1], loaded.size[0], size[1], size[0])
    cache_path = cache_identity = table = None
    if opts.cached_clip:
        cache_path, cache_identity = open_eval_cache(opts.cache, opts.prepared, manifest,
                                                     opts.split, loaded.clip)
        table = EmbeddingTable(cache_path, opts.split)
    return Inputs(manifest, frames, dataset, fixations, loaded, cache_path, cache_identity,
                  table)


def score_split(opts: EvalOptions, inputs: Inputs) -> list[dict[str, Any]]:
    """The model (or baseline) over the split in shard order, each frame scored in the pool (and
    exported for MATLAB with ``--export-mat``): one row per frame, :data:`ID_COLUMNS`, the
    metrics and, with ``--seeds`` above 1, ``"spread"``."""
    seeds = [opts.seed + k for k in range(opts.seeds)]
    rows: list[dict[str, Any]] = []
    waiting: deque[dict[str, Any]] = deque()

    def collect(results: Iterable[dict[str, float]]) -> None:
        for scores in results:
            rows.append({**waiting.popleft(), **scores})
            bar.update(1)

    with contextlib.ExitStack() as stack:
        client = (stack.enter_context(dask_client(address=opts.dask_address))
                  if opts.dask_address else None)
        pool = FramePool(opts.workers, client)
        stack.callback(pool.close)
        bar = stack.enter_context(progress(total=inputs.frames, unit="frame",
                                           desc=f"evaluate {opts.split}"))
        samples = iter_samples(opts.prepared, inputs.manifest, opts.split)
        for batch in batched(samples, opts.batch_size):
            for sample, pred in zip(batch, _predictions(inputs, batch)):
                key, meta = sample["key"], sample["meta"]
                if pred is not None and not np.isfinite(pred).all():
                    raise BadInputError(opts.checkpoint, f"non-finite prediction for sample"
                                        f" {key}")
                label = sample["label"][0].numpy()
                if opts.export_mat:
                    matlab_export.write_frame(opts.export_mat, meta["name"],
                                              np.ones_like(label) if pred is None else pred,
                                              label)
                waiting.append({"index": len(rows) + len(waiting), "key": key,
                                "name": meta["name"], "video": meta.get("video"),
                                "frame": meta.get("frame")})
                fix = matlab_points(sample["fixations"]) if inputs.fixations else None
                collect(pool.submit(pred, label, fix, seeds, key, opts.jitter))
        collect(pool.drain())
    if len(rows) != inputs.frames:
        raise BadInputError(opts.prepared, f"split {opts.split!r} has {len(rows)} readable"
                            f" samples, the manifest lists {inputs.frames}")
    return rows


def _predictions(inputs: Inputs, batch: list[dict[str, Any]]) -> list[np.ndarray | None]:
    """The predicted maps [H, W] of a batch: the model's, or the baseline's for every frame
    (None: uniform)."""
    if inputs.baseline is not None:
        fixed = None if inputs.baseline.map is None else inputs.baseline.map.astype(np.float32)
        return [fixed] * len(batch)
    frames = torch.stack([s["frame"] for s in batch])
    emb = (None if inputs.table is None else torch.stack(
        [torch.from_numpy(inputs.table.lookup(s["index"], s["key"], False)) for s in batch]))
    return list(predict_batch(inputs.loaded, frames, emb))


def video_of(row: dict[str, Any]) -> str:
    """The video a row belongs to: its ``video`` field, else the folder of its name."""
    if row.get("video") is not None:
        return str(row["video"])
    return str(Path(row["name"]).parent)


def by_video(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each video (:func:`video_of`), videos in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(video_of(row), []).append(row)
    return groups


def per_video(rows: Sequence[dict[str, Any]], metric_names: Sequence[str]
              ) -> list[dict[str, Any]]:
    """One row per video in first-seen order: ``video``, ``frames`` and each metric's mean
    over the video's frames where it is defined (:func:`finite_means`)."""
    return [{"video": video, "frames": len(members), **finite_means(members, metric_names)}
            for video, members in by_video(rows).items()]


def video_csv_bytes(videos: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["video", "frames", *metric_names],
                            lineterminator="\n")
    writer.writeheader()
    for row in videos:
        writer.writerow({"video": row["video"], "frames": row["frames"],
                         **{m: repr(float(row[m])) for m in metric_names}})
    return buf.getvalue().encode()


def ranked_videos(videos: Sequence[dict[str, Any]], metric: str = "CC", count: int = 3
                  ) -> dict[str, Any]:
    """The ``count`` best and worst videos by ``metric`` (higher is better; NaN left out)."""
    scored = sorted((v for v in videos if not math.isnan(v[metric])),
                    key=lambda v: (-v[metric], v["video"]))
    pick = [{"video": v["video"], "frames": v["frames"], metric: v[metric]} for v in scored]
    return {"ranked_by": metric, "videos": len(videos), "best": pick[:count],
            "worst": pick[::-1][:count]}


def seed_spread(rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any] | None:
    """Per metric of :data:`SPREAD_METRICS`: the split's official mean under each seed, their
    mean and sample standard deviation; None with one seed (or no fixations)."""
    if len(seeds) < 2 or "spread" not in rows[0]:
        return None
    out = {}
    for m in SPREAD_METRICS:
        # each seed's mean exactly as metrics.aggregate takes the first one's
        per_seed = np.array([np.mean(np.array([r["spread"][m][k] for r in rows],
                                              dtype=np.float64)) for k in range(len(seeds))])
        out[m] = {"mean": float(per_seed.mean()), "std": float(per_seed.std(ddof=1)),
                  "per_seed": [float(v) for v in per_seed]}
    return {"seeds": list(seeds), "metrics": out}


BOOTSTRAP_LEVEL = 0.95


def bootstrap_intervals(rows: Sequence[dict[str, Any]], metric_names: Sequence[str],
                        replicates: int, seed: int) -> dict[str, Any]:
    """Percentile bootstrap over videos: ``replicates`` times, draw as many videos as the split
    has, with replacement, keep all their frames, and take each metric's mean over the drawn
    frames where it is defined; the 2.5th and 97.5th percentiles of those means are the 95%
    interval. Draws from a generator seeded by (``seed``, "bootstrap"), so the interval is
    reproducible."""
    members = list(by_video(rows).values())
    rng = np.random.default_rng([seed, int.from_bytes(b"bootstrap", "big")])
    draws = rng.integers(0, len(members), size=(replicates, len(members)))
    weights = np.stack([np.bincount(d, minlength=len(members)) for d in draws])   # [R, V]
    low, high = 100 * (1 - BOOTSTRAP_LEVEL) / 2, 100 * (1 + BOOTSTRAP_LEVEL) / 2
    out = {}
    for m in metric_names:
        values = [np.array([r[m] for r in group], dtype=np.float64) for group in members]
        sums = np.array([np.nansum(v) for v in values])
        counts = np.array([np.count_nonzero(~np.isnan(v)) for v in values])
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (weights @ sums) / (weights @ counts)
        means = means[~np.isnan(means)]
        out[m] = ([float(np.percentile(means, low)), float(np.percentile(means, high))]
                  if means.size else None)
    return {"replicates": replicates, "unit": "video", "videos": len(members),
            "level": BOOTSTRAP_LEVEL, "method": "percentile", "intervals": out}


def write_outputs(opts: EvalOptions, inputs: Inputs, rows: list[dict[str, Any]]
                  ) -> dict[str, Any]:
    """``per_frame.csv``, ``per_video.csv``, ``results.md`` and ``summary.json`` (last); the
    summary."""
    scores = metrics.aggregate([{m: r[m] for m in r if m not in (*ID_COLUMNS, "spread")}
                                for r in rows])
    names = list(scores.means)
    loaded, dataset, baseline = inputs.loaded, inputs.dataset, inputs.baseline
    out = Folder(opts.out)
    out.makedirs()
    data = csv_bytes(rows, names)
    out.write_bytes(CSV_NAME, data)
    videos = per_video(rows, names)
    video_data = video_csv_bytes(videos, names)
    out.write_bytes(VIDEO_CSV_NAME, video_data)
    ranked = ranked_videos(videos) if "CC" in names else None
    spread = seed_spread(rows, [opts.seed + k for k in range(opts.seeds)])
    intervals = (bootstrap_intervals(rows, names, opts.bootstrap, opts.seed)
                 if opts.bootstrap else None)
    made_by = (f"baseline {baseline.name}" if baseline is not None else
               f"checkpoint {Path(opts.checkpoint).name}, sha256 {loaded.info['sha256'][:12]}")
    title = (f"{inputs.predictor} on {dataset} {opts.split} ({len(rows)} frames; data version"
             f" {inputs.version}; {made_by})")
    note = RANDOM_NOTE if loaded is not None and loaded.clip.random else None
    defined = finite_means(rows, names)
    row_name = f"{dataset} {opts.split}"
    shown = dict(scores.means)
    if spread is not None:
        shown.update({m: v["mean"] for m, v in spread["metrics"].items()})
    table = table_text(title, row_name, shown, note, scores.nan_frames, defined,
                       spread=None if spread is None else {row_name: {
                           m: v["std"] for m, v in spread["metrics"].items()}})
    table += extra_text(spread, intervals, ranked)
    out.write_bytes(TABLE_NAME, table.encode())
    summary = {
        "dataset": {"prepared": opts.prepared, "dataset": dataset,
                    "version_id": inputs.version, "split": opts.split, "frames": len(rows)},
        "predictor": inputs.predictor,
        "checkpoint": None if loaded is None else loaded.info,
        "baseline": None if baseline is None else {"name": baseline.name, "fit": baseline.fit},
        "clip": None if loaded is None else {
            "mode": "cached" if opts.cached_clip else "inline",
            "options": {"model": loaded.clip.model, "pretrained": loaded.clip.pretrained,
                        "profile": loaded.clip.profile},
            "cache": inputs.cache_path, "cache_identity": inputs.cache_identity},
        "note": note,
        "seed": opts.seed,
        "seeds": opts.seeds,
        "jitter": opts.jitter,
        "device": None if loaded is None else str(loaded.device),
        "autocast": (str(loaded.autocast) if loaded is not None and loaded.autocast is not None
                     else None),
        "metrics": names,
        "means": {m: _jsonable(v) for m, v in scores.means.items()},
        "means_without_nan": {m: _jsonable(v) for m, v in defined.items()},
        "nan_frames": scores.nan_frames,
        "n_frames": scores.n_frames,
        "spread": spread,
        "bootstrap": intervals,
        "videos": ranked,
        "outputs": {"csv": {"name": CSV_NAME, "sha256": hashlib.sha256(data).hexdigest()},
                    "video_csv": {"name": VIDEO_CSV_NAME,
                                  "sha256": hashlib.sha256(video_data).hexdigest()},
                    "table": TABLE_NAME, "export_mat": opts.export_mat},
    }
    out.write_bytes(SUMMARY_NAME, (json.dumps(summary, indent=1) + "\n").encode())
    log.info("results (%s):\n%s", out.url(TABLE_NAME), metrics.format_table({row_name: shown}))
    for name, count in scores.nan_frames.items():
        if count:
            log.warning("%s is NaN on %d of %d frames (so its mean is NaN, as in MATLAB)",
                        name, count, scores.n_frames)
    if ranked is not None and ranked["best"]:
        log.info("best video %s (CC %.4f), worst %s (CC %.4f) of %d", ranked["best"][0]["video"],
                 ranked["best"][0]["CC"], ranked["worst"][0]["video"],
                 ranked["worst"][0]["CC"], ranked["videos"])
    return summary


def extra_text(spread: dict[str, Any] | None, intervals: dict[str, Any] | None,
               ranked: dict[str, Any] | None) -> str:
    """The lines of ``results.md`` below the table: seeds, bootstrap intervals, videos."""
    lines = []
    if spread is not None:
        seeds = spread["seeds"]
        lines.append(f"{', '.join(spread['metrics'])}: mean ± standard deviation over"
                     f" {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}) of the metrics' random"
                     " draws; the other metrics have none.")
    if intervals is not None:
        cells = ", ".join(f"{m} [{v[0]:.4f}, {v[1]:.4f}]" for m, v in
                          intervals["intervals"].items() if v is not None)
        lines.append(f"{intervals['level']:.0%} bootstrap intervals over videos"
                     f" ({intervals['replicates']} replicates of {intervals['videos']} videos,"
                     f" percentile method): {cells}.")
    if ranked is not None and ranked["best"]:
        def names(picked: list[dict[str, Any]]) -> str:
            return ", ".join(f"{v['video']} ({v['CC']:.4f})" for v in picked)
        lines.append(f"By CC over {ranked['videos']} videos: best {names(ranked['best'])};"
                     f" worst {names(ranked['worst'])} ({VIDEO_CSV_NAME}).")
    return "".join(f"\n{line}\n" for line in lines)


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Run the evaluation ``opts`` describes; returns the summary (also in ``summary.json``).
    One evaluation writes a ``--out`` folder at a time (a second is refused in one line)."""
    inputs = open_inputs(opts)
    out = Folder(opts.out)
    with out.lock(subject=opts.out):
        out.remove_unfinished()     # what a killed evaluation left: no one else writes here now
        return _evaluate_into(opts, inputs)


def _evaluate_into(opts: EvalOptions, inputs: Inputs) -> dict[str, Any]:
    # Results of an earlier run in the same folders would read as this run's if it fails:
    # the summary (written last) marks the outputs complete, the name list the export.
    Folder(opts.out).remove(SUMMARY_NAME)
    if opts.export_mat:
        Folder(opts.export_mat).remove(matlab_export.NAMES_FILE)
    log.info("evaluating %s on %s split %r of %s (version %s, %d frames)%s, %d metric"
             " worker(s)", inputs.predictor, inputs.dataset, opts.split, opts.prepared,
             inputs.version, inputs.frames, "" if inputs.loaded is None else
             ", CLIP " + ("cached" if inputs.table is not None else "inline"), opts.workers)
    rows = score_split(opts, inputs)
    if opts.export_mat:
        Folder(opts.export_mat).write_bytes(EXPORT_RECORD, (json.dumps({
            "dataset": inputs.dataset, "split": opts.split, "version_id": inputs.version,
            "predictor": inputs.predictor, "frames": len(rows),
            "results": str(Path(opts.out).resolve()) if "://" not in opts.out else opts.out,
        }, indent=1) + "\n").encode())
        matlab_export.write_name_list(Path(opts.export_mat) / matlab_export.NAMES_FILE,
                                      [r["name"] for r in rows])
        log.info("exported %d frames for MATLAB to %s", len(rows), opts.export_mat)
    return write_outputs(opts, inputs, rows)


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m salmm.evaluate`` parser."""
    parser = argparse.ArgumentParser(
        prog="python -m salmm.evaluate",
        description="Score a SalM2 checkpoint on a prepared split with the official metrics"
                    " (AUC_B, AUC_J, NSS, CC, SIM, KLD): per-frame CSV, summary JSON, markdown"
                    " table, optionally .mat files for the official MATLAB scripts. "
                    + MODEL_OPTIONS_NOTE)
    add_model_options(parser, prepared=True, checkpoint_required=False)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--baseline", choices=BASELINES,
                       help="score a reference predictor instead of a checkpoint: center (a"
                            " centre Gaussian fitted on the train labels), mean (the mean train"
                            " label) or uniform")
    group.add_argument("--seeds", type=positive_int, default=EvalOptions.seeds, metavar="N",
                       help="score AUC_B and AUC_J under seeds --seed..--seed+N-1 and report"
                            " mean ± std (default 1: the single numbers)")
    group.add_argument("--bootstrap", type=non_negative_int, default=0, metavar="N",
                       help="95%% bootstrap intervals over videos from N replicates (default 0:"
                            " none)")
    group.add_argument("--split", default="test", help="split to score (default test)")
    group.add_argument("--out", required=True, metavar="DIR",
                       help=f"folder for {CSV_NAME}, {TABLE_NAME}, {SUMMARY_NAME}")
    group.add_argument("--export-mat", metavar="DIR",
                       help="also write pre/ and tar/ .mat files and test.mat for MATLAB")
    group.add_argument("--batch-size", type=positive_int, default=EvalOptions.batch_size)
    where = group.add_mutually_exclusive_group()
    where.add_argument("--workers", type=non_negative_int, default=usable_cores(),
                       help="processes scoring frames (0: score in this process; default: one"
                            " per usable core)")
    where.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                       help="score the frames on this Dask cluster (the one normalize used)")
    group.add_argument("--seed", type=non_negative_int, default=EvalOptions.seed,
                       help="seeds the metrics' random draws (AUC-Borji samples, AUC-Judd"
                            " jitter), per frame")
    group.add_argument("--no-jitter", dest="jitter", action="store_false",
                       help="no AUC-Judd tie-breaking jitter")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> EvalOptions:
    parser = build_parser()
    opts = parse_model_args(parser, EvalOptions, argv)
    if (opts.checkpoint is None) == (opts.baseline is None):
        parser.error("give --checkpoint or --baseline (one of them)")
    if opts.baseline is not None and opts.cached_clip:
        parser.error("--cached-clip is for a checkpoint; a baseline uses no CLIP")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: bad input)."""
    opts = parse_args(argv)
    return run_command(lambda: evaluate(opts))


if __name__ == "__main__":
    sys.exit(main())
