"""``python -m salmm.evaluate``: score a checkpoint on a prepared split with the official metrics.

The run, top to bottom:

1. Inputs, all checked before any frame is scored: the prepared dataset's manifest and split;
   the checkpoint (ours from :mod:`salmm.train`, or an official ``model_best_*.tar``, read by
   :func:`salmm.official.read_official`, which names every wrong key); the CLIP embeddings -
   the cache (``--cached-clip``; made from this dataset version with the checkpoint's CLIP
   model, weights and profile) or the frozen CLIP run inline with the checkpoint's options.
2. The model over the split in shard order, no flip (``frame / 255`` as in training).
3. Per frame, :func:`salmm.metrics.evaluate_frame` - CC, SIM, KLD of the prediction against the
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
   scripts (:mod:`salmm.matlab_export`; the name list is written last).

Also holds what ``python -m salmm.predict`` shares: loading a checkpoint with the CLIP it was
trained with (:func:`load_model`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.clip import PUBLISHED, RANDOM_NOTE, ClipSpec, cached_encoder
from pipeline.clip_cache import open_checked_cache
from pipeline.datasets import REGISTRY
from pipeline.errors import BadInputError
from pipeline.fsio import Folder
from pipeline.manifest import prepared_size
from pipeline.progress import progress
from pipeline.shards import decode_fixations, decode_meta, split_shards
from salmm import metrics
from salmm.options import (
    add_clip_options,
    add_inference_options,
    add_runtime_options,
    non_negative_int,
    positive_int,
    run_command,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("salmm.evaluate")

CSV_NAME = "per_frame.csv"
TABLE_NAME = "results.md"
SUMMARY_NAME = "summary.json"
ID_COLUMNS = ("index", "key", "name", "video", "frame")
FROM_CHECKPOINT = object()
"""Default of the CLIP options: take the value the checkpoint was trained with."""
PUBLISHED_CLIP = {"clip_model": PUBLISHED.model, "clip_pretrained": PUBLISHED.pretrained,
                  "profile": PUBLISHED.profile}
"""CLIP options of the official checkpoints: ViT-B-32, OpenAI weights, the published profile."""


# ---- the checkpoint and its CLIP ---------------------------------------------------------------


@dataclass
class LoadedModel:
    """A checkpoint's SalMM in eval mode on ``device``, with what it was trained with.

    ``size``: (height, width) it was trained at; ``info``: its identity for summaries (path,
    sha256, kind "salmm-train" | "official", epoch, valid_loss, dataset_version, git_commit);
    ``clip``: the CLIP options in use (run inline when the model carries the encoder).
    """

    model: torch.nn.Module
    device: torch.device
    autocast: torch.dtype | None
    size: tuple[int, int]
    info: dict[str, Any]
    clip: ClipSpec


def _sha256(path: str) -> str:
    folder, _, name = path.rpartition("/")
    return Folder(folder or ".").sha256(name)


def checkpoint_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The training options stored in one of our checkpoints; None for an official one."""
    from salmm.checkpoint import FORMAT

    if raw.get("format") != FORMAT or not isinstance(raw.get("config"), dict):
        return None
    return raw["config"]


def resolve_clip(path: str, config: dict[str, Any] | None, given: dict[str, Any]) -> ClipSpec:
    """The CLIP options to use: each one the user ``given`` (:data:`FROM_CHECKPOINT` when not),
    else what the checkpoint was trained with (``config``; the published ones for an official
    checkpoint).

    BadInputError (naming the checkpoint) when a given model name or profile differs from the
    training one, or random weights are swapped for real ones or back: the model would get
    embeddings it never saw. Other weights (say a local copy of the OpenAI file for "openai")
    are allowed with a warning.
    """
    trained = {k: config[k] for k in PUBLISHED_CLIP} if config is not None else None
    chosen = {}
    for key, default in PUBLISHED_CLIP.items():
        value = given.get(key, FROM_CHECKPOINT)
        if value is FROM_CHECKPOINT:
            value = trained[key] if trained is not None else default
        chosen[key] = value
    if trained is not None:
        option = {"clip_model": "--clip-model", "profile": "--profile"}
        for key, flag in option.items():
            if chosen[key] != trained[key]:
                raise BadInputError(path, f"trained with {flag} {trained[key]}, not"
                                    f" {chosen[key]}; leave {flag} out to use the checkpoint's")
        if chosen["clip_pretrained"] != trained["clip_pretrained"]:
            if None in (chosen["clip_pretrained"], trained["clip_pretrained"]):
                raise BadInputError(path, f"trained with CLIP weights"
                                    f" {trained['clip_pretrained'] or 'none (random)'}, not"
                                    f" {chosen['clip_pretrained'] or 'none (random)'}; leave"
                                    " --clip-pretrained out to use the checkpoint's")
            log.warning("%s was trained with CLIP weights %s; using %s - scores are only"
                        " comparable if these are the same weights", path,
                        trained["clip_pretrained"], chosen["clip_pretrained"])
    choice = ClipSpec(chosen["clip_model"], chosen["clip_pretrained"], chosen["profile"])
    if choice.pretrained is None:
        log.warning("CLIP with RANDOM weights (--clip-pretrained none): for tests and smoke runs"
                    " only, the predictions mean nothing")
    return choice


def pick_device(name: str | None) -> torch.device:
    """``--device``, default cuda when available else cpu."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(path: str, *, inline_clip: bool, given_clip: dict[str, Any],
               device: str | None = None, amp: str = "off") -> LoadedModel:
    """Load checkpoint ``path`` (ours or official; every key checked) into a SalMM on ``device``.

    ``inline_clip``: attach the frozen CLIP encoder (built from :func:`resolve_clip`'s choice)
    so the model embeds frames itself; otherwise embeddings are passed in. BadInputError (one
    line naming the file) for a missing, unreadable or mismatching checkpoint.
    """
    from salmm.checkpoint import load_checkpoint
    from salmm.model import SalMM
    from salmm.official import read_official
    from salmm.train import autocast_dtype

    path = str(path)
    raw = load_checkpoint(path)
    weights = read_official(path)
    config = checkpoint_config(raw)
    clip = resolve_clip(path, config, given_clip)
    dev = pick_device(device)
    encoder = None
    if inline_clip:
        encoder = cached_encoder(clip, str(dev))
    model = SalMM(clip=encoder)
    model.load_state_dict(weights.state_dict, strict=True)
    model.to(dev).eval()
    info = {
        "path": path,
        "sha256": _sha256(path),
        "kind": "salmm-train" if config is not None else "official",
        "epoch": weights.epoch,
        "valid_loss": weights.valid_loss,
        "dataset_version": raw.get("dataset_version"),
        "git_commit": raw.get("git_commit"),
        "trained_cached_clip": config.get("cached_clip") if config else None,
    }
    size = tuple(config["size"]) if config is not None else (256, 256)
    log.info("checkpoint %s (%s, epoch %s, sha256 %s...)", path, info["kind"], info["epoch"],
             info["sha256"][:12])
    return LoadedModel(model, dev, autocast_dtype(amp, dev), size, info, clip)


def predict_batch(loaded: LoadedModel, frames: torch.Tensor, emb: torch.Tensor | None
                  ) -> np.ndarray:
    """uint8 frames [B, 3, H, W] (and embeddings [B, D] unless CLIP runs inline) -> predicted
    saliency float32 [B, H, W] in (0, 1)."""
    import torch

    with torch.inference_mode():
        x = frames.to(loaded.device).float().div_(255)
        if emb is not None:
            emb = emb.to(loaded.device)
        if loaded.autocast is None:
            out = loaded.model(x, emb)
        else:
            with torch.autocast(loaded.device.type, dtype=loaded.autocast):
                out = loaded.model(x, emb)
        return out.float()[:, 0].cpu().numpy()


def given_clip_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """The CLIP options the user gave on a parsed command line, as (name, value) pairs; the
    others are taken from the checkpoint."""
    return tuple((k, getattr(args, k)) for k in PUBLISHED_CLIP
                 if getattr(args, k) is not FROM_CHECKPOINT)


MODEL_OPTIONS_NOTE = ("The CLIP options default to the ones the checkpoint was trained with"
                      " (ViT-B-32, openai, salmm for an official checkpoint); --amp defaults to"
                      " off (float32).")


def add_model_options(parser: argparse.ArgumentParser, *, prepared: bool) -> None:
    """The options evaluate and predict share: checkpoint, data, CLIP (defaulting to the
    checkpoint's), device and autocast (default off). See :data:`MODEL_OPTIONS_NOTE`."""
    add_inference_options(parser, prepared=prepared)
    add_clip_options(parser)
    add_runtime_options(parser)
    parser.set_defaults(**dict.fromkeys(PUBLISHED_CLIP, FROM_CHECKPOINT), amp="off")


# ---- the prepared split ------------------------------------------------------------------------


def read_split(prepared: str, split: str) -> tuple[dict[str, Any], int]:
    """(manifest, sample count) of ``split``; BadInputError naming the manifest when the split
    is unknown or empty."""
    from pipeline.manifest import read_manifest

    manifest = read_manifest(prepared)
    where = Folder(prepared).url("manifest.json")
    splits = manifest.get("splits", {})
    if split not in splits:
        raise BadInputError(where, f"no split {split!r} (has {', '.join(sorted(splits))})")
    samples = int(splits[split].get("samples", 0))
    if samples == 0:
        raise BadInputError(where, f"split {split!r} has no samples")
    return manifest, samples


def iter_samples(prepared: str, manifest: dict[str, Any], split: str) -> Iterator[dict[str, Any]]:
    """The split's samples in shard order: ``key``, ``frame`` uint8 [3, H, W], ``label`` float32
    [1, H, W], ``fixations`` int [N, 2] (row, col at source resolution), ``meta`` (the sample's
    json: dataset, video, frame, name, ...)."""
    from salmm.data import decode, read_shards

    size = prepared_size(manifest)
    for raw in read_shards(split_shards(prepared, manifest, split)):
        fixations, meta = decode_fixations(raw), decode_meta(raw)
        (sample,) = decode([raw], size)
        yield {**sample, "fixations": fixations, "meta": meta}


def batched(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of up to ``size`` consecutive items."""
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_eval_cache(path: str | None, prepared: str, manifest: dict[str, Any], split: str,
                    clip: ClipSpec) -> tuple[str, dict[str, Any]]:
    """(path, identity) of the CLIP cache after checking it was made from this dataset version
    with ``clip``'s model, weights and profile and holds every sample of ``split``."""
    return open_checked_cache(path, prepared, manifest, clip.identity(), [split])


# ---- scoring -----------------------------------------------------------------------------------


def matlab_fixations(fixations: np.ndarray) -> np.ndarray:
    """A shard's fixation points -> the 0-based (row, col) points the official MATLAB loop marks.

    The shard stores the published Python loader's points: the raw ``fixdata`` values
    truncated and used as 0-based indices (kept in rows 0..719, columns 0..1279). The MATLAB
    loop reads the same values as 1-based indices, so its points are one up and left:
    ``(row - 1, col - 1)``; a point on row or column 0, which MATLAB skips, becomes -1 and
    :func:`salmm.metrics.fixation_map` drops it. (A raw point on row 720 or column 1280,
    which MATLAB keeps, never reaches the shard: the loader drops it.) int64 [N, 2].
    """
    return np.asarray(fixations, dtype=np.int64).reshape(-1, 2) - 1


def frame_seed(seed: int, key: str) -> list[int]:
    """Entropy of one frame's generator: the run's seed and 64 bits of sha256 of its key."""
    return [seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")]


def score_frame(pred: np.ndarray, label: np.ndarray, fixations: np.ndarray | None, seed: int,
                key: str, jitter: bool) -> dict[str, float]:
    """:func:`salmm.metrics.evaluate_frame` with the frame's own generator (a pool task)."""
    rng = np.random.default_rng(frame_seed(seed, key))
    return metrics.evaluate_frame(pred, label, fixations, rng=rng, jitter=jitter)


class FramePool:
    """Scores frames in ``workers`` processes (0: in this process), results in submission
    order; at most ``4 * workers`` frames wait, so memory stays flat."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                      if workers > 0 else None)
        self._pending: deque[Future | dict[str, float]] = deque()

    def submit(self, *args: Any) -> Iterator[dict[str, float]]:
        """Queue one frame; yields the results that are due (oldest first)."""
        if self._pool is None:
            yield score_frame(*args)
            return
        self._pending.append(self._pool.submit(score_frame, *args))
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
               defined_means: dict[str, float] | None = None) -> str:
    """Markdown: a title line, the ``note`` (when given) as a bold line, and
    :func:`salmm.metrics.format_table` of one row - two when some metric is undefined (NaN) on
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
    return f"{head}\n\n{metrics.format_table(rows)}\n"


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
    """What ``python -m salmm.evaluate`` was asked to do."""

    checkpoint: str
    prepared: str
    out: str
    split: str = "test"
    export_mat: str | None = None
    cached_clip: bool = False
    cache: str | None = None
    batch_size: int = 16
    workers: int = 0
    seed: int = 0
    jitter: bool = True
    device: str | None = None
    amp: str = "off"
    clip: tuple[tuple[str, Any], ...] = ()      # given CLIP options (see given_clip_options)


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Run the evaluation ``opts`` describes; returns the summary (also in ``summary.json``)."""
    import torch

    from pipeline.manifest import version_id
    from salmm import matlab_export

    manifest, n_frames = read_split(opts.prepared, opts.split)
    version = version_id(manifest)
    dataset = manifest.get("dataset", "unknown")
    fixation_metrics = dataset in REGISTRY and REGISTRY[dataset].has_fixations
    loaded = load_model(opts.checkpoint, inline_clip=not opts.cached_clip,
                        given_clip=dict(opts.clip), device=opts.device, amp=opts.amp)
    size = prepared_size(manifest)
    if size[0] % 32 or size[1] % 32:
        raise BadInputError(opts.prepared, f"prepared at {size[1]}x{size[0]}; SalMM needs"
                            " width and height that are multiples of 32")
    if size != loaded.size:
        log.warning("the checkpoint was trained at %dx%d, the prepared data is %dx%d",
                    loaded.size[1], loaded.size[0], size[1], size[0])
    cache_path, cache_identity, table = None, None, None
    if opts.cached_clip:
        from salmm.data import EmbeddingTable

        cache_path, cache_identity = open_eval_cache(opts.cache, opts.prepared, manifest,
                                                     opts.split, loaded.clip)
        table = EmbeddingTable(cache_path, opts.split)
    # Results of an earlier run in the same folders would read as this run's if it fails:
    # the summary (written last) marks the outputs complete, the name list the export.
    Folder(opts.out).remove(SUMMARY_NAME)
    if opts.export_mat:
        Folder(opts.export_mat).remove(matlab_export.NAMES_FILE)
    log.info("evaluating %s split %r of %s (version %s, %d frames), CLIP %s, %d metric"
             " worker(s)", dataset, opts.split, opts.prepared, version, n_frames,
             "cached" if table is not None else "inline", opts.workers)

    rows: list[dict[str, Any]] = []
    names: list[str] = []
    frames_meta: deque[dict[str, Any]] = deque()
    pool = FramePool(opts.workers)

    def collect(results: Iterable[dict[str, float]]) -> None:
        for scores in results:
            rows.append({**frames_meta.popleft(), **scores})
            bar.update(1)

    try:
        with progress(total=n_frames, unit="frame", desc=f"evaluate {opts.split}") as bar:
            samples = iter_samples(opts.prepared, manifest, opts.split)
            for batch in batched(samples, opts.batch_size):
                frames = torch.stack([s["frame"] for s in batch])
                emb = (torch.stack([torch.from_numpy(table.lookup(s["key"], False)) for s in batch])
                       if table is not None else None)
                preds = predict_batch(loaded, frames, emb)
                for sample, pred in zip(batch, preds):
                    key, meta = sample["key"], sample["meta"]
                    if not np.isfinite(pred).all():
                        raise BadInputError(opts.checkpoint, f"non-finite prediction for"
                                            f" sample {key}")
                    label = sample["label"][0].numpy()
                    if opts.export_mat:
                        matlab_export.write_frame(opts.export_mat, meta["name"], pred, label)
                    names.append(meta["name"])
                    frames_meta.append({"index": len(names) - 1, "key": key,
                                        "name": meta["name"], "video": meta.get("video"),
                                        "frame": meta.get("frame")})
                    fix = matlab_fixations(sample["fixations"]) if fixation_metrics else None
                    collect(pool.submit(pred, label, fix, opts.seed, key, opts.jitter))
            collect(pool.drain())
    finally:
        pool.close()
    if len(rows) != n_frames:
        raise BadInputError(opts.prepared, f"split {opts.split!r} has {len(rows)} readable"
                            f" samples, the manifest lists {n_frames}")
    if opts.export_mat:
        matlab_export.write_name_list(Path(opts.export_mat) / matlab_export.NAMES_FILE, names)
        log.info("exported %d frames for MATLAB to %s", len(names), opts.export_mat)

    scores = metrics.aggregate([{m: r[m] for m in r if m not in ID_COLUMNS} for r in rows])
    names_order = list(scores.means)
    out = Folder(opts.out)
    out.makedirs()
    data = csv_bytes(rows, names_order)
    out.write_bytes(CSV_NAME, data)
    title = (f"SalM2 on {dataset} {opts.split} ({len(rows)} frames; data version {version};"
             f" checkpoint {Path(opts.checkpoint).name}, sha256 {loaded.info['sha256'][:12]})")
    note = RANDOM_NOTE if loaded.clip.random else None
    defined = finite_means(rows, names_order)
    text = table_text(title, f"{dataset} {opts.split}", scores.means, note, scores.nan_frames,
                      defined)
    out.write_bytes(TABLE_NAME, text.encode())
    summary = {
        "dataset": {"prepared": opts.prepared, "dataset": dataset, "version_id": version,
                    "split": opts.split, "frames": len(rows)},
        "checkpoint": loaded.info,
        "clip": {"mode": "cached" if opts.cached_clip else "inline",
                 "options": {"model": loaded.clip.model, "pretrained": loaded.clip.pretrained,
                             "profile": loaded.clip.profile},
                 "cache": cache_path, "cache_identity": cache_identity},
        "note": note,
        "seed": opts.seed,
        "jitter": opts.jitter,
        "device": str(loaded.device),
        "autocast": str(loaded.autocast) if loaded.autocast is not None else None,
        "metrics": names_order,
        "means": {m: _jsonable(v) for m, v in scores.means.items()},
        "means_without_nan": {m: _jsonable(v) for m, v in defined.items()},
        "nan_frames": scores.nan_frames,
        "n_frames": scores.n_frames,
        "outputs": {"csv": {"name": CSV_NAME, "sha256": hashlib.sha256(data).hexdigest()},
                    "table": TABLE_NAME, "export_mat": opts.export_mat},
    }
    out.write_bytes(SUMMARY_NAME, (json.dumps(summary, indent=1) + "\n").encode())
    log.info("results (%s):\n%s", out.url(TABLE_NAME), metrics.format_table(
        {f"{dataset} {opts.split}": scores.means}))
    for name, count in scores.nan_frames.items():
        if count:
            log.warning("%s is NaN on %d of %d frames (so its mean is NaN, as in MATLAB)",
                        name, count, scores.n_frames)
    return summary


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m salmm.evaluate`` parser."""
    parser = argparse.ArgumentParser(
        prog="python -m salmm.evaluate",
        description="Score a SalM2 checkpoint on a prepared split with the official metrics"
                    " (AUC_B, AUC_J, NSS, CC, SIM, KLD): per-frame CSV, summary JSON, markdown"
                    " table, optionally .mat files for the official MATLAB scripts. "
                    + MODEL_OPTIONS_NOTE)
    add_model_options(parser, prepared=True)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--split", default="test", help="split to score (default test)")
    group.add_argument("--out", required=True, metavar="DIR",
                       help=f"folder for {CSV_NAME}, {TABLE_NAME}, {SUMMARY_NAME}")
    group.add_argument("--export-mat", metavar="DIR",
                       help="also write pre/ and tar/ .mat files and test.mat for MATLAB")
    group.add_argument("--batch-size", type=positive_int, default=EvalOptions.batch_size)
    group.add_argument("--workers", type=non_negative_int, default=os.cpu_count() or 1,
                       help="processes scoring frames (0: score in this process; default: one"
                            " per CPU)")
    group.add_argument("--seed", type=non_negative_int, default=EvalOptions.seed,
                       help="seeds the metrics' random draws (AUC-Borji samples, AUC-Judd"
                            " jitter), per frame")
    group.add_argument("--no-jitter", dest="jitter", action="store_false",
                       help="no AUC-Judd tie-breaking jitter")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> EvalOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cache is not None and not args.cached_clip:
        parser.error("--cache is only used with --cached-clip")
    return EvalOptions(
        checkpoint=args.checkpoint, prepared=args.prepared, split=args.split, out=args.out,
        export_mat=args.export_mat, cached_clip=args.cached_clip, cache=args.cache,
        batch_size=args.batch_size, workers=args.workers, seed=args.seed, jitter=args.jitter,
        device=args.device, amp=args.amp,
        clip=given_clip_options(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: bad input)."""
    opts = parse_args(argv)
    return run_command(lambda: evaluate(opts))


if __name__ == "__main__":
    sys.exit(main())
