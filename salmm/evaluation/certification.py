"""``python -m salmm.certify``: run the authors' official MATLAB evaluation loop on an export and
set its numbers beside ours.

``python -m salmm.certify --export DIR --official-metrics DIR_WITH_M_FILES [--root RAW]
[--engine auto|octave|matlab]``

``DIR`` is what ``python -m salmm.evaluate ... --export-mat DIR`` wrote (``pre/``, ``tar/``,
``test.mat`` and ``salmm.json``, which names the dataset and the evaluation's results folder).
``DIR_WITH_M_FILES`` holds ``calcForTrafficGaze.m`` / ``calcForDrFixDrainy.m`` /
``calcForBDDA.m`` and the metric functions (``metrics/calcForDataset`` of the SalM² release;
they are not distributed with salmm). TrafficGaze and DrFixD-rainy loops read the raw
dataset's ``fixdata/fixdata{V}.mat`` files: ``--root`` is the raw download.

The loop runs under GNU Octave (``octave-cli``, with its ``image`` package) or MATLAB
(``matlab -batch``), whichever is found (``--engine`` to choose), and saves its per-frame
scores to ``DIR/metrics.mat``. Logged and written to ``DIR/certificate.md``: both tables side
by side, the largest per-frame
difference for each metric, and the verdict. NSS, CC, SIM and KLD have no randomness and must
agree per frame to :data:`TOLERANCE`; AUC_B and AUC_J draw random numbers (MATLAB's own
generator there, numpy's here), so they are compared as means, with the seed spread of
``--seeds`` when the evaluation had one. Exit 0: certified; 1: a deterministic metric differs;
2: bad input (one line).

Octave differs from MATLAB in one place the loops touch: ``mean`` of an empty list is empty,
not NaN, so under Octave the TrafficGaze / DrFixD-rainy loop fails on a frame without
fixation points (reported in one line; MATLAB runs it).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.datasets import REGISTRY
from salmm.evaluation import metrics
from salmm.evaluation.options import CertifyOptions
from salmm.evaluation.report import CSV_NAME, EXPORT_RECORD, SUMMARY_NAME

log = logging.getLogger("salmm.certify")

LOOPS = {"trafficgaze": "calcForTrafficGaze", "drfixd-rainy": "calcForDrFixDrainy",
         "bdda": "calcForBDDA"}
VARIABLES = {"AUC_B": "auc_b_scores", "AUC_J": "auc_j_scores", "NSS": "NSS_scores",
             "CC": "CC_scores", "SIM": "Sim_scores", "KLD": "KLD_scores"}
RANDOM = ("AUC_B", "AUC_J")
TOLERANCE = 1e-6
"""Largest per-frame difference allowed on NSS, CC, SIM and KLD."""
CERTIFICATE = "certificate.md"


def _record(export: Path) -> dict[str, Any]:
    where = export / EXPORT_RECORD
    try:
        record = json.loads(where.read_text())
    except FileNotFoundError:
        raise BadInputError(where, "no such file: not an export of python -m salmm.evaluate"
                            " --export-mat") from None
    except (OSError, ValueError) as err:
        raise BadInputError(where, f"unreadable ({type(err).__name__})") from None
    if record.get("dataset") not in LOOPS:
        raise BadInputError(where, f"dataset {record.get('dataset')!r} has no official loop")
    return record


def _engine(choice: str) -> tuple[str, str]:
    """(kind, executable) of the MATLAB-language engine to use."""
    found = {"octave": shutil.which("octave-cli") or shutil.which("octave"),
             "matlab": shutil.which("matlab")}
    order = ["matlab", "octave"] if choice == "auto" else [choice]
    for kind in order:
        if found[kind]:
            return kind, found[kind]
    raise BadInputError("--engine", f"{' or '.join(order)} is not installed (GNU Octave: apt-get"
                        " install octave octave-image)")


def engine_command(kind: str, exe: str, function: str, work: Path) -> list[str]:
    """The engine's command line for the official loop ``function``. Paths never enter the
    source the engine runs: it reads them from the environment (``getenv('SALMM_OFFICIAL')``,
    ``SALMM_EXPORT``, ``SALMM_SECOND``, ``SALMM_TEST``), so a folder named with quotes,
    ``%``, ``;`` or newlines is data, never code. Octave runs a driver file written in
    ``work``."""
    call = (f"addpath(getenv('SALMM_OFFICIAL')); {function}(getenv('SALMM_EXPORT'),"
            " getenv('SALMM_SECOND'), getenv('SALMM_TEST'));")
    if kind == "octave":
        script = work / "certify_driver.m"
        script.write_text(f"pkg load image;\nsave_default_options('-v7');\n{call}\n")
        return [exe, "--no-gui", "--quiet", "--norc", str(script)]
    return [exe, "-batch", call]


def run_loop(opts: CertifyOptions, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the dataset's official loop on the export; its per-frame scores (metric -> [N])."""
    export = Path(opts.export).resolve()
    official = Path(opts.official_metrics).resolve()
    function = LOOPS[record["dataset"]]
    needed = [f"{function}.m", "AUC_Borji.m", "AUC_Judd.m", "NSS.m", "CC.m", "similarity.m",
              "KLdiv.m"]
    missing = [f for f in needed if not (official / f).is_file()]
    if missing:
        raise BadInputError(official, f"lacks {', '.join(missing)} (metrics/calcForDataset of"
                            " the SalM2 release)")
    if REGISTRY[record["dataset"]].has_fixations:
        if opts.root is None:
            raise BadInputError("--root", f"the {function} loop reads the raw dataset's fixdata"
                                " files: give the raw download's folder")
        fixdata = Path(opts.root).resolve() / "fixdata"
        if not fixdata.is_dir():
            raise BadInputError(fixdata, "no such folder (the raw dataset's fixdata files)")
        second = f"{fixdata}/fixdata"
    else:
        second = f"{export}/"
    kind, exe = _engine(opts.engine)
    (export / "metrics.mat").unlink(missing_ok=True)
    paths = {"SALMM_OFFICIAL": str(official), "SALMM_EXPORT": f"{export}/",
             "SALMM_SECOND": second, "SALMM_TEST": f"{export}/test.mat"}
    with tempfile.TemporaryDirectory() as work:
        command = engine_command(kind, exe, function, Path(work))
        log.info("running %s under %s on %d frames", function, kind, record["frames"])
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False,
                              timeout=opts.timeout_s, env={**os.environ, **paths})
    if done.returncode != 0:
        said = (done.stderr + "\n" + done.stdout).strip().splitlines()
        first = next((line for line in said if line.lower().startswith("error")),
                     said[-1] if said else "no output").strip()
        why = (" (a frame without fixation points stops the official AUC code)"
               if "'tp' undefined" in first else "")
        raise BadInputError(export, f"the official loop failed under {kind}"
                            f" ({done.returncode}): {first}{why}")
    try:
        saved = scipy.io.loadmat(export / "metrics.mat")
    except (OSError, ValueError, NotImplementedError) as err:
        raise BadInputError(export / "metrics.mat", f"unreadable ({err})") from None
    return {m: np.asarray(saved[v], dtype=np.float64).ravel() for m, v in VARIABLES.items()
            if v in saved and np.asarray(saved[v]).size}


def ours(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(summary, per-frame scores) of the evaluation the export came with."""
    results = Path(record["results"])
    try:
        summary = json.loads((results / SUMMARY_NAME).read_text())
        with open(results / CSV_NAME, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as err:
        raise BadInputError(results, f"the evaluation's results cannot be read"
                            f" ({type(err).__name__})") from None
    return summary, {m: np.array([float(r[m]) for r in rows]) for m in summary["metrics"]}


def comparison(summary: dict[str, Any], mine: dict[str, np.ndarray],
               theirs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per metric: our mean, the official mean, the difference of the means, the
    largest per-frame difference (NaN frames equal when both are NaN)."""
    rows = []
    spread = (summary.get("spread") or {}).get("metrics", {})
    for m in metrics.METRIC_ORDER:
        if m not in mine or m not in theirs:
            continue
        a, b = mine[m], theirs[m]
        if a.shape != b.shape:
            raise BadInputError("metrics.mat", f"{m}: {b.size} frames scored by the official"
                                f" loop, {a.size} by salmm")
        both_nan = np.isnan(a) & np.isnan(b)
        frame = np.where(both_nan, 0.0, np.abs(a - b))
        rows.append({"metric": m, "salmm": float(np.mean(a)), "official": float(np.mean(b)),
                     "mean_difference": abs(float(np.mean(a)) - float(np.mean(b))),
                     "frame_difference": float(np.nanmax(frame)) if frame.size else 0.0,
                     "random": m in RANDOM, "seed_std": (spread.get(m) or {}).get("std")})
    return rows


def certify(opts: CertifyOptions) -> int:
    """Run, print, and return the exit status (0 certified, 1 a deterministic metric differs)."""
    record = _record(Path(opts.export))
    summary, mine = ours(record)
    theirs = run_loop(opts, record)
    rows = comparison(summary, mine, theirs)
    lines = [(f"{record['predictor']} on {record['dataset']} {record['split']}"
              f" ({record['frames']} frames, data version {record['version_id']})"),
             "", "| metric | salmm | official | mean diff | largest frame diff |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['salmm']:.6f} | {r['official']:.6f} |"
                     f" {r['mean_difference']:.2e} | {r['frame_difference']:.2e}"
                     f"{' (random draws differ)' if r['random'] else ''} |")
    exact = [r for r in rows if not r["random"]]
    worst = max((r["frame_difference"] for r in exact), default=0.0)
    worst = 0.0 if math.isnan(worst) else worst
    random_rows = [r for r in rows if r["random"]]
    lines.append("")
    lines.append(f"largest per-frame difference on {', '.join(r['metric'] for r in exact)}:"
                 f" {worst:.3g} (tolerance {TOLERANCE:g})")
    for r in random_rows:
        std = r["seed_std"]
        lines.append(f"{r['metric']}: means differ by {r['mean_difference']:.3g}" + (
            f" (salmm's seed std {std:.3g})" if std is not None else
            " (run evaluate with --seeds N for its sampling spread)"))
    ok = worst <= TOLERANCE
    lines.append("CERTIFIED: the official loop agrees" if ok else
                 "NOT CERTIFIED: a deterministic metric differs from the official loop")
    text = "\n".join(lines) + "\n"
    Folder(opts.export).write_bytes(CERTIFICATE, text.encode())
    (log.info if ok else log.error)("%s(also in %s)", text, Path(opts.export) / CERTIFICATE)
    return 0 if ok else 1
