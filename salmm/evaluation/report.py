"""An evaluation's outputs: ``per_frame.csv``, ``per_video.csv``, ``results.md`` and
``summary.json`` (written last, so its presence marks the outputs complete)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.fsio import Folder
from pipeline.encoders.clip_spec import RANDOM_NOTE
from salmm.evaluation import metrics
from salmm.evaluation.protocols import PROTOCOLS
from salmm.evaluation.protocols import aggregate as protocol_means
from salmm.evaluation.statistics import (
    bootstrap_intervals,
    finite_means,
    per_video,
    ranked_videos,
    seed_spread,
)

if TYPE_CHECKING:
    from salmm.evaluation.evaluator import EvalOptions, Inputs

log = logging.getLogger("salmm.evaluate")


CSV_NAME = "per_frame.csv"
VIDEO_CSV_NAME = "per_video.csv"
TABLE_NAME = "results.md"
SUMMARY_NAME = "summary.json"
EXPORT_RECORD = "salmm.json"
"""Written into ``--export-mat``: what was exported and where its results are
(``python -m salmm.certify`` reads it)."""
ID_COLUMNS = ("index", "key", "name", "video", "frame")


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


def video_csv_bytes(videos: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["video", "frames", *metric_names],
                            lineterminator="\n")
    writer.writeheader()
    for row in videos:
        writer.writerow({"video": row["video"], "frames": row["frames"],
                         **{m: repr(float(row[m])) for m in metric_names}})
    return buf.getvalue().encode()


def undefined_note(means: dict[str, float]) -> str | None:
    """The line under a table that explains its "-" cells (metrics the data cannot give)."""
    missing = [m for m in metrics.METRIC_ORDER if m not in means]
    if not missing:
        return None
    return (f"\"-\": {', '.join(missing)} need fixation points; this dataset's ground truth is"
            " gaze maps only (as BDDA's and DR(eye)VE's is), so they cannot be"
            " computed - the paper's BDDA row has none either.")


def table_text(title: str, row_name: str, means: dict[str, float], note: str | None = None,
               undefined: dict[str, int] | None = None,
               defined_means: dict[str, float] | None = None,
               spread: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown: a title line, the ``note`` (when given) as a bold line, and
    :func:`salmm.evaluation.metrics.format_table`. When some metric is undefined (NaN) on some
    frames (``undefined``: metric -> frames), the first row is ``defined_means`` over the
    frames where each metric is defined, named with how many were left out, and the second the
    official means (NaN, as MATLAB's). A line under the table explains any "-"."""
    head = f"{title}\n\n**{note}**" if note else title
    skipped = {m: k for m, k in (undefined or {}).items() if k}
    if skipped and defined_means is not None:
        left_out = ", ".join(f"{m} {k}" for m, k in skipped.items())
        rows = {f"{row_name} (defined frames; undefined: {left_out})": defined_means,
                f"{row_name} (official mean: NaN as MATLAB)": means}
        if spread:
            spread = dict.fromkeys(rows, next(iter(spread.values())))
        head += ("\n\nUndefined on some frames (NaN: e.g. an all-zero label): "
                 + ", ".join(f"{m} on {k}" for m, k in skipped.items())
                 + ". The first row leaves those frames out; the second is the official mean,"
                 " NaN as in the MATLAB loops.")
    else:
        rows = {row_name: means}
    below = undefined_note(means)
    return (f"{head}\n\n{metrics.format_table(rows, spread=spread)}\n"
            + (f"\n{below}\n" if below else ""))


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
                     f" worst {names(ranked['worst']) or 'none (one video)'}"
                     f" ({VIDEO_CSV_NAME}).")
    return "".join(f"\n{line}\n" for line in lines)


def _jsonable(value: float) -> float | None:
    return None if math.isnan(value) else value


def protocol_text(row_name: str, protocol: dict[str, Any]) -> str:
    """The lines of a benchmark's own metrics under the main table."""
    names = protocol["metrics"]
    cells = " | ".join("NaN" if protocol["means"][m] is None else f"{protocol['means'][m]:.4f}"
                       for m in names)
    return (f"\n{protocol['name']} ({protocol['source']}; {protocol['videos']} videos):\n\n"
            f"| | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n| {row_name} | {cells} |\n")


def write_outputs(opts: EvalOptions, inputs: Inputs, rows: list[dict[str, Any]]
                  ) -> dict[str, Any]:
    """``per_frame.csv``, ``per_video.csv``, ``results.md`` and ``summary.json`` (last); the
    summary."""
    scores = metrics.aggregate([{m: r[m] for m in r
                                 if m not in (*ID_COLUMNS, "spread", "protocol")}
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
    protocol = None
    if inputs.protocol is not None:
        spec = PROTOCOLS[inputs.protocol]
        protocol = {"name": spec.name, "source": spec.source, "metrics": list(spec.metrics),
                    "means": {m: _jsonable(v) for m, v in
                              protocol_means(rows, spec).items()},
                    "videos": len({r["video"] for r in rows})}
        table += protocol_text(row_name, protocol)
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
        "protocol": protocol,
        "outputs": {"csv": {"name": CSV_NAME, "sha256": hashlib.sha256(data).hexdigest()},
                    "video_csv": {"name": VIDEO_CSV_NAME,
                                  "sha256": hashlib.sha256(video_data).hexdigest()},
                    "table": TABLE_NAME, "export_mat": opts.export_mat},
    }
    out.write_bytes(SUMMARY_NAME, (json.dumps(summary, indent=1) + "\n").encode())
    log.info("results (%s):\n%s", out.url(TABLE_NAME), table)
    for name, count in scores.nan_frames.items():
        if count:
            log.warning("%s is NaN on %d of %d frames (so its mean is NaN, as in MATLAB)",
                        name, count, scores.n_frames)
    if ranked is not None and ranked["worst"]:
        log.info("best video %s (CC %.4f), worst %s (CC %.4f) of %d", ranked["best"][0]["video"],
                 ranked["best"][0]["CC"], ranked["worst"][0]["video"],
                 ranked["worst"][0]["CC"], ranked["videos"])
    return summary
