"""From nothing to a trained, evaluated SalM² model in one command: ``python -m flows.quickstart``.

Steps (each one the real entry point a user would run by hand):

1. raw data: a small **synthetic** dataset in the real BDDA download layout, or ``--root`` a real download;
2. the embedded services: a local Prefect server on loopback and the deployment server (:mod:`flows.local`);
3. ``prefect deployment run prepare/<dataset> --watch``: shards, CLIP cache, verification, publication;
4. ``python -m salmm.train --cached-clip`` for a few epochs;
5. ``python -m salmm.evaluate`` on the test split and ``python -m salmm.predict`` for heatmap overlays;
6. stop the services and print where everything is.

CLIP weights default to the real ``openai`` ones. Where they cannot be had (no network, not in the
local cache; found out in a few seconds), the run on the synthetic demo data goes on with random
CLIP weights and says so in its first lines, in the closing summary and in every output that
carries numbers ("random CLIP weights: a smoke run"); with ``--root`` (real data) it stops before
doing anything and says how to point at a local weight file or opt into random weights
(``--clip-pretrained none``, a smoke run whose model is meaningless).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.config import RAW_DIRNAMES
from flows.local import local_services
from pipeline.core.errors import BadInputError
from pipeline.datasets import SYNTHETIC_MARKER
from pipeline.datasets.synthetic import write_dataset
from pipeline.encoders.clip import (
    DEFAULT_MODEL,
    DEFAULT_WEIGHTS,
    RANDOM_NOTE,
    ClipSpec,
    cached_encoder,
    parse_weights,
)
from salmm.evaluation.report import TABLE_NAME

log = logging.getLogger("quickstart")

DEFAULT_WORK = Path(".salmm") / "quickstart"


@dataclass
class Outcome:
    """What the quickstart made, for the closing summary."""

    synthetic: bool
    raw: Path
    clip_note: str | None = None
    ui_url: str | None = None
    version_id: str | None = None
    prepared: Path | None = None
    cache: str | None = None
    run: Path | None = None
    table: str | None = None
    pictures: list[Path] = field(default_factory=list)


def choose_clip_weights(model: str, pretrained: str | None, synthetic: bool) -> tuple[str | None, str | None]:
    """The CLIP weights the run uses and, when they are random, the note that says so.

    Builds the encoder once, so missing weights are known before anything starts: on the
    synthetic demo data the run then goes on with random weights (a smoke run); on real data
    (``--root``) it stops.

    Raises:
        SystemExit: real data and the weights cannot be had; the message says how to go on.
    """
    if pretrained is None:
        note = f"{RANDOM_NOTE} (--clip-pretrained none); the model learns nothing real"
        log.warning("CLIP: %s", note)
        return None, note
    try:
        cached_encoder(ClipSpec(model, pretrained))
    except BadInputError as err:
        if not synthetic:
            raise SystemExit(
                f"quickstart: cannot get the CLIP {model} weights '{pretrained}' ({err.problem}).\n"
                "  Point at a local weight file:  python -m flows.quickstart --clip-pretrained /path/to/ViT-B-32.pt\n"
                "  or opt into random weights for a smoke run:  python -m flows.quickstart --clip-pretrained none"
            ) from None
        reason = err.problem.split(";")[0].removeprefix(f"could not get the {model} weights").strip(" ()")
        note = (
            f"{RANDOM_NOTE}: the {model} '{pretrained}' weights cannot be had here ({reason}),"
            " so this demo on synthetic data uses random CLIP weights and learns nothing real;"
            " pass --clip-pretrained /path/to/ViT-B-32.pt for the real ones"
        )
        log.warning("CLIP: %s", note)
        return None, note
    return pretrained, None


def synthesize(dataset: str, raw: Path, videos: int, frames: int, seed: int) -> Path:
    """A synthetic raw dataset at ``raw`` (reused when an identical one is already there)."""
    if (raw / SYNTHETIC_MARKER).exists():
        log.info("reusing the SYNTHETIC dataset at %s", raw)
        return raw
    if raw.exists():
        shutil.rmtree(raw)
    return write_dataset(dataset, raw, videos=videos, frames=frames, seed=seed)


def run_step(title: str, cmd: list[str], env: dict[str, str] | None, log_path: Path) -> str:
    """Run one step's command, its output streamed to the console and kept in ``log_path``.

    Raises:
        SystemExit: the command failed; the message names the step and the log.
    """
    log.info("── %s\n   $ %s", title, " ".join(cmd))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with (
        open(log_path, "w") as keep,
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            keep.write(line)
            lines.append(line)
            sys.stderr.write("   " + line)
    if process.returncode != 0:
        raise SystemExit(
            f"quickstart: step '{title}' failed (exit {process.returncode}); its output is in {log_path}"
        )
    return "".join(lines)


def quickstart(args: argparse.Namespace) -> Outcome:
    """The steps of the module docstring, each the real entry point; what they made."""
    work: Path = args.work.resolve()
    dataset = args.dataset
    synthetic = args.root is None
    weights, note = choose_clip_weights(args.clip_model, args.clip_pretrained, synthetic)
    raw = args.root.resolve() if args.root else work / "raw" / RAW_DIRNAMES[dataset]
    if synthetic:
        synthesize(dataset, raw, args.videos, args.frames, args.seed)
    outcome = Outcome(synthetic=synthetic, raw=raw, prepared=work / "prepared" / dataset,
                      clip_note=note)
    logs, py, pretrained = work / "logs", sys.executable, weights or "none"
    with local_services(home=work / "prefect") as services:
        outcome.ui_url = services.ui_url
        log.info("Prefect UI: %s (open it to watch the flow run)",
                 services.ui_url or services.api_url)
        params = {"root": raw, "out": outcome.prepared, "size": args.size,
                  "clip_model": args.clip_model, "clip_pretrained": pretrained}
        run_step(f"prefect deployment run prepare/{dataset}",
                 [py, "-m", "prefect", "deployment", "run", f"prepare/{dataset}", "--watch",
                  *(f for k, v in params.items() for f in ("--param", f"{k}={v}"))],
                 services.env, logs / "prepare.log")
        published = json.loads((outcome.prepared / "published.json").read_text())
        outcome.version_id, outcome.cache = published["version_id"], published["cache"]["path"]
        outcome.run = (work / "runs"
                       / f"{dataset}-{outcome.version_id}-{time.strftime('%Y%m%d-%H%M%S')}")
        cached = ["--cached-clip", "--cache", outcome.cache]
        run_step("python -m salmm.train --cached-clip",
                 [py, "-m", "salmm.train", "--cached-clip", "--prepared", str(outcome.prepared),
                  "--out", str(outcome.run), "--epochs", str(args.epochs), "--batch-size",
                  str(args.batch_size), "--size", args.size, "--workers", "0",
                  "--clip-model", args.clip_model, "--clip-pretrained", pretrained],
                 None, logs / "train.log")
        checkpoint = outcome.run / "best.pt"
        evaluation, predictions = outcome.run / "evaluation", outcome.run / "predictions"
        run_step("python -m salmm.evaluate",
                 [py, "-m", "salmm.evaluate", "-q", "--checkpoint", str(checkpoint), "--prepared",
                  str(outcome.prepared), "--split", "test", "--out", str(evaluation), *cached],
                 None, logs / "evaluate.log")
        run_step("python -m salmm.predict",
                 [py, "-m", "salmm.predict", "--checkpoint", str(checkpoint), "--input",
                  str(outcome.prepared), "--split", "test", "--limit", str(args.predict_frames),
                  "--out", str(predictions), *cached],
                 None, logs / "predict.log")
    outcome.table = (evaluation / TABLE_NAME).read_text()
    outcome.pictures = sorted(outcome.run.glob("*.png")) + sorted(predictions.glob("animation.*"))
    outcome.pictures += sorted(predictions.rglob("*.png"))[:3]
    return outcome


def summary(outcome: Outcome) -> str:
    """The closing text: where everything is."""
    tag = (
        " (SYNTHETIC data: generated frames and gaze, not real recordings)"
        if outcome.synthetic
        else ""
    )
    lines = [
        "",
        f"salmm quickstart finished{tag}",
        f"  raw data        {outcome.raw}",
        f"  Prefect UI      {outcome.ui_url or '-'} (stopped now; `python -m flows.local` starts it again)",
        f"  version id      {outcome.version_id}",
        f"  prepared data   {outcome.prepared}",
        f"  CLIP cache      {outcome.cache}",
        f"  run folder      {outcome.run}",
        *([f"  CLIP weights    {outcome.clip_note}"] if outcome.clip_note else []),
        "",
        "Test-split metrics" + tag + ":",
        outcome.table or "  (no metrics table was written)",
        "Pictures:",
        *[f"  {path}" for path in outcome.pictures],
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.quickstart", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(RAW_DIRNAMES),
        default="bdda",
        help="dataset layout (default bdda; synthetic unless --root is given)",
    )
    parser.add_argument(
        "--root", type=Path, help="a real raw download of --dataset instead of synthetic data"
    )
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="working folder (default %(default)s)"
    )
    parser.add_argument("--clip-model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--clip-pretrained",
        default=DEFAULT_WEIGHTS,
        type=parse_weights,
        help="openai (default), a local weight file, hf-hub:..., or none (random weights); on the"
        " synthetic demo data, weights that cannot be had fall back to random ones",
    )
    parser.add_argument(
        "--size",
        default="256x256",
        help="frame size WIDTHxHEIGHT (default %(default)s, the model's input)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--videos", type=int, default=6, help="synthetic videos (default %(default)s)"
    )
    parser.add_argument(
        "--frames", type=int, default=16, help="synthetic frames per video (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--predict-frames", type=int, default=8, help="frames to draw overlays for")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        outcome = quickstart(args)
    except BadInputError as err:
        raise SystemExit(f"quickstart: {err}") from None
    log.info("%s", summary(outcome))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
