"""``python -m salmm.compare``: every checkpoint and baseline on every prepared split, one table.

``python -m salmm.compare --checkpoint A.pt --checkpoint B.tar --baseline center --prepared X
--prepared Y --out DIR [--cached-clip] [--seeds N] [--bootstrap N]``

Each (predictor, dataset) cell is one :func:`salmm.evaluate.evaluate` run into
``DIR/runs/<predictor>/<dataset>/`` (its per-frame and per-video CSVs, results.md and
summary.json). A cell whose ``summary.json`` is already there and records the same checkpoint
sha256 (or baseline), data version, split and metric options is reused, so an interrupted
comparison resumes. Then, written atomically with ``comparison.json`` last:

* ``comparison.md`` - rows are the predictors, columns each dataset's metrics in the paper's
  order (AUC_B, AUC_J, NSS, CC, SIM, KLD; BDDA has CC, SIM, KLD), ``mean ± std`` over seeds
  for the AUCs with ``--seeds`` above 1; below it, which data version and checkpoint each row
  and column is;
* ``comparison.csv`` - one line per cell and metric: predictor, checkpoint sha256 (or
  baseline), dataset, data version, split, frames, metric, value, std, bootstrap interval;
* ``comparison.json`` - the same cells with everything their summaries record.

Checkpoints are loaded with the CLIP options they were trained with (official ones: ViT-B-32,
OpenAI weights, the published profile); with ``--cached-clip`` each dataset's embeddings come
from its default cache for those options.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats.prepared import PreparedDataset
from salmm.evaluation import metrics
from salmm.evaluation.evaluator import evaluate
from salmm.evaluation.options import CompareOptions, EvalOptions
from salmm.evaluation.report import SUMMARY_NAME
from salmm.model import hub

log = logging.getLogger("salmm.compare")

TABLE_NAME, CSV_NAME, JSON_NAME = "comparison.md", "comparison.csv", "comparison.json"


@dataclass(frozen=True)
class Predictor:
    """One row: a checkpoint (``sha256`` of its file) or a baseline, and its folder name."""

    label: str
    folder: str
    checkpoint: str | None = None
    sha256: str | None = None
    baseline: str | None = None


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... when taken; recorded in ``used``."""
    folder, n = name, 2
    while folder in used:
        folder, n = f"{name}-{n}", n + 1
    used.add(folder)
    return folder


def predictors(opts: CompareOptions) -> list[Predictor]:
    """The rows, checkpoints first (files, Hub folders or Hub ids; BadInputError for one
    that is not there), folder names unique."""
    rows, used = [], set()
    for path in opts.checkpoint:
        sha = hub.weights_sha256(hub.resolve(path))
        rows.append(Predictor(Path(path).name, _unique(Path(path).stem, used), path, sha))
    for name in opts.baseline:
        rows.append(Predictor(f"{name} baseline", f"baseline-{name}", baseline=name))
    return rows


def datasets(opts: CompareOptions) -> list[dict[str, Any]]:
    """Each ``--prepared``: path, dataset name, version id, a unique folder name."""
    out, used = [], set()
    for prepared in opts.prepared:
        data = PreparedDataset.open(prepared)
        out.append({"prepared": prepared, "dataset": data.dataset,
                    "folder": _unique(data.dataset, used), "version_id": data.version})
    return out


def reusable(summary_path: Path, predictor: Predictor, data: dict[str, Any],
             opts: CompareOptions) -> dict[str, Any] | None:
    """The summary of an earlier run of this cell with the same inputs and options, else None."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None
    recorded = ((summary.get("checkpoint") or {}).get("sha256"),
                (summary.get("baseline") or {}).get("name"),
                summary.get("dataset", {}).get("version_id"), summary.get("dataset", {}).get(
                    "split"), summary.get("seed"), summary.get("seeds"),
                (summary.get("bootstrap") or {}).get("replicates", 0))
    wanted = (predictor.sha256, predictor.baseline, data["version_id"], opts.split, opts.seed,
              opts.seeds, opts.bootstrap)
    return summary if recorded == wanted else None


def run_cell(opts: CompareOptions, predictor: Predictor, data: dict[str, Any]
             ) -> dict[str, Any]:
    """The summary of one (predictor, dataset) evaluation, reused when it is already there."""
    out = Path(opts.out) / "runs" / predictor.folder / data["folder"]
    summary = reusable(out / SUMMARY_NAME, predictor, data, opts)
    if summary is not None:
        log.info("%s on %s: reusing %s", predictor.label, data["folder"], out)
        return summary
    log.info("%s on %s", predictor.label, data["folder"])
    return evaluate(EvalOptions(
        checkpoint=predictor.checkpoint, baseline=predictor.baseline,
        prepared=data["prepared"], out=str(out), split=opts.split,
        cached_clip=opts.cached_clip and predictor.checkpoint is not None, seeds=opts.seeds,
        seed=opts.seed, bootstrap=opts.bootstrap, workers=opts.workers, device=opts.device))


def cell(predictor: Predictor, data: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What the tables keep of one evaluation."""
    spread = (summary.get("spread") or {}).get("metrics", {})
    intervals = (summary.get("bootstrap") or {}).get("intervals", {})
    defined = summary.get("means_without_nan") or summary["means"]
    values = {m: defined[m] for m in summary["metrics"]}
    values.update({m: v["mean"] for m, v in spread.items()})
    return {"predictor": predictor.label, "checkpoint_sha256": predictor.sha256,
            "baseline": predictor.baseline, "dataset": data["dataset"],
            "column": data["folder"], "prepared": data["prepared"],
            "version_id": summary["dataset"]["version_id"], "split": summary["dataset"]["split"],
            "frames": summary["dataset"]["frames"], "values": values,
            "std": {m: v["std"] for m, v in spread.items()}, "bootstrap": intervals,
            "note": summary.get("note"), "baseline_fit": (summary.get("baseline") or {}).get(
                "fit"), "official": {m: summary["means"][m] for m in summary["metrics"]},
            "undefined": {m: k for m, k in (summary.get("nan_frames") or {}).items() if k},
            "protocol": summary.get("protocol")}


def _number(value: float | None, std: float | None) -> str:
    if value is None:
        return "NaN"
    return f"{value:.4f}" + ("" if std is None else f" ± {std:.4f}")


def _describe(p: Predictor) -> str:
    if p.sha256:
        return f"{p.label} = sha256 {p.sha256[:12]}"
    if p.baseline == "uniform":
        return f"{p.label} (a constant map: nothing fitted)"
    return f"{p.label} (fitted on each dataset's train labels)"


def table_text(cells: list[dict[str, Any]], data: list[dict[str, Any]],
               rows: list[Predictor]) -> str:
    """``comparison.md``."""
    columns = []
    protocols: dict[str, str] = {}
    for d in data:
        present = [m for m in metrics.METRIC_ORDER if any(
            m in c["values"] for c in cells if c["column"] == d["folder"])]
        columns += [(d["folder"], m) for m in present]
        own = next((c["protocol"] for c in cells
                    if c["column"] == d["folder"] and c.get("protocol")), None)
        if own:             # the benchmark's own metrics, marked with a dagger
            protocols[d["folder"]] = f"{own['name']} ({own['source']})"
            columns += [(d["folder"], f"{m}†") for m in own["metrics"]]
    by_key = {(c["predictor"], c["column"]): c for c in cells}
    lines = ["| | " + " | ".join(f"{folder} {m}" for folder, m in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    starred = dashed = False
    for p in rows:
        out = []
        for folder, m in columns:
            c = by_key.get((p.label, folder))
            if m.endswith("†"):
                value = ((c or {}).get("protocol") or {}).get("means", {}).get(m[:-1])
                out.append(_number(value, None))
                continue
            if c is None or m not in c["values"]:
                out.append("-")
                dashed = True
                continue
            star = "*" if m in c["undefined"] else ""
            starred = starred or bool(star)
            out.append(_number(c["values"][m], c["std"].get(m)) + star)
        lines.append(f"| {p.label} | " + " | ".join(out) + " |")
    legend = ["", "Datasets (test split unless said): " + "; ".join(
        f"{d['folder']} = {d['prepared']} (data version {d['version_id']})" for d in data) + ".",
              "", "Predictors: " + "; ".join(_describe(p) for p in rows) + "."]
    if starred:
        legend += ["", ("\\* the mean over the frames where the metric is defined; its official"
                        " mean (NaN as in MATLAB) and the frames left out are in"
                        " comparison.json.")]
    missing = sorted({m for d in data for m in metrics.METRIC_ORDER
                      if (d["folder"], m) not in columns}, key=metrics.METRIC_ORDER.index)
    if dashed or missing:
        legend += ["", ("\"-\": not defined there - AUC_B, AUC_J and NSS need fixation points,"
                        " and a gaze-map dataset without them (BDDA, DR(eye)VE) has none"
                        + (f"; {', '.join(missing)} are left out of the columns of datasets"
                           " without them" if missing else "") + ".")]
    if protocols:
        legend += ["", "† the dataset's own benchmark metrics: " + "; ".join(
            f"{folder}: {name}" for folder, name in protocols.items()) + "."]
    notes = sorted({c["note"] for c in cells if c["note"]})
    if notes:
        legend += ["", *(f"**{n}**" for n in notes)]
    return "# Comparison\n\n" + "\n".join(lines + legend) + "\n"


def csv_text(cells: list[dict[str, Any]]) -> str:
    """``comparison.csv``: one line per cell and metric."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["predictor", "checkpoint_sha256", "baseline", "dataset", "column",
                     "version_id", "split", "frames", "metric", "value", "std", "ci_low",
                     "ci_high"])
    for c in cells:
        for m, value in c["values"].items():
            ci = c["bootstrap"].get(m) or [None, None]
            writer.writerow([c["predictor"], c["checkpoint_sha256"] or "", c["baseline"] or "",
                             c["dataset"], c["column"], c["version_id"], c["split"],
                             c["frames"], m, "nan" if value is None else repr(value),
                             "" if m not in c["std"] else repr(c["std"][m]),
                             "" if ci[0] is None else repr(ci[0]),
                             "" if ci[1] is None else repr(ci[1])])
    return buf.getvalue()


def compare(opts: CompareOptions) -> dict[str, Any]:
    """Run every cell; write the three tables (``comparison.json`` last); returns its content."""
    if not opts.checkpoint and not opts.baseline:
        raise BadInputError("--checkpoint", "nothing to compare: give --checkpoint and/or"
                            " --baseline")
    rows, data = predictors(opts), datasets(opts)
    out = Folder(opts.out)
    with out.lock(subject=opts.out):                # one comparison writes a folder at a time
        out.remove_unfinished()
        return _compare_into(opts, out, rows, data)


def _compare_into(opts: CompareOptions, out: Folder, rows: list[Predictor],
                  data: list[dict[str, Any]]) -> dict[str, Any]:
    cells = [cell(p, d, run_cell(opts, p, d)) for p in rows for d in data]
    out.remove(JSON_NAME)
    table = table_text(cells, data, rows)
    out.write_bytes(TABLE_NAME, table.encode())
    out.write_bytes(CSV_NAME, csv_text(cells).encode())
    result = {"split": opts.split, "seed": opts.seed, "seeds": opts.seeds,
              "bootstrap": opts.bootstrap, "metric_order": list(metrics.METRIC_ORDER),
              "datasets": data, "cells": cells}
    out.write_bytes(JSON_NAME, (json.dumps(result, indent=1) + "\n").encode())
    log.info("comparison (%s):\n%s", out.url(TABLE_NAME), table)
    return result
