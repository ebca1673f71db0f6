"""An evaluation, top to bottom (``salmm evaluate``; :mod:`salmm.compare` runs many).

1. Inputs, all checked before any frame is scored: the prepared dataset and split; the checkpoint
   (ours, or an official ``model_best_*.tar``, read by :func:`salmm.model.official.read_official`,
   which names every wrong key); the CLIP embeddings - the cache (``--cached-clip``; made from
   this dataset version with the checkpoint's CLIP model, weights and profile) or the frozen CLIP
   run inline with the checkpoint's options (:mod:`salmm.model.loading`).
2. The model over the split in shard order, no flip (``frame / 255`` as in training).
3. Per frame, :func:`salmm.evaluation.metrics.evaluate_frame` (:mod:`.scoring`) - CC, SIM, KLD of
   the prediction against the label at the model's resolution; AUC-Borji, AUC-Judd and NSS
   against the binary map of the raw fixation points at the frame's size (TrafficGaze,
   DrFixD-rainy 720x1280; DADA-2000 660x1584, from its fixation maps; BDDA and DR(eye)VE have
   CC, SIM, KLD only, as the official script), in a process pool; where the dataset's
   benchmark has metrics of its own (DR(eye)VE: :mod:`.protocols`), those too.
4. Outputs (:mod:`.report`, statistics from :mod:`.statistics`): ``per_frame.csv``,
   ``per_video.csv``, ``results.md``, ``summary.json`` last; with ``export_mat``, ``pre/`` and
   ``tar/`` ``.mat`` files and the ``test.mat`` name list for the official MATLAB scripts
   (:mod:`.matlab_export`; the name list is written last).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.dask_cluster import dask_client
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.progress import progress
from pipeline.datasets import FRAME_SIZE, REGISTRY
from pipeline.formats.labels import matlab_points
from pipeline.formats.prepared import PreparedDataset
from salmm.data.samples import batched, iter_samples
from salmm.data.stages import EmbeddingTable
from salmm.evaluation import matlab_export
from salmm.evaluation.baselines import Baseline, fit_baseline
from salmm.evaluation.options import EvalOptions
from salmm.evaluation.protocols import PROTOCOLS
from salmm.evaluation.report import EXPORT_RECORD, SUMMARY_NAME, write_outputs
from salmm.evaluation.scoring import FramePool
from salmm.model.loading import LoadedModel, load_model, predict_batch

log = logging.getLogger("salmm.evaluate")


@dataclass
class Inputs:
    """What an evaluation reads, checked: the split's manifest and sample count, its dataset
    (and whether it has fixations), the loaded checkpoint, and the cached embeddings (None
    when CLIP runs inline)."""

    data: PreparedDataset
    frames: int
    dataset: str
    fixations: bool
    loaded: LoadedModel | None
    cache_path: str | None
    cache_identity: dict[str, Any] | None
    table: EmbeddingTable | None
    baseline: Baseline | None = None
    protocol_base: np.ndarray | None = None

    @property
    def protocol(self) -> str | None:
        """The dataset's own benchmark protocol (:data:`~salmm.evaluation.protocols.PROTOCOLS`),
        or None."""
        return self.dataset if self.dataset in PROTOCOLS else None

    @property
    def version(self) -> str:
        return self.data.version

    @property
    def predictor(self) -> str:
        """What is scored, as the tables name it."""
        if self.baseline is not None:
            return self.baseline.label
        return f"SalM2 ({Path(self.loaded.info['path']).name})"


def open_inputs(opts: EvalOptions) -> Inputs:
    """Every input of ``opts``, checked before any frame is scored."""
    data = PreparedDataset.open(opts.prepared)
    frames = data.checked_split(opts.split)
    dataset = data.dataset
    fixations = dataset in REGISTRY and REGISTRY[dataset].scores_fixations
    base = _protocol_base(data) if dataset in PROTOCOLS else None
    if opts.baseline is not None:
        baseline = fit_baseline(opts.baseline, data)
        return Inputs(data, frames, dataset, fixations, None, None, None, None, baseline, base)
    loaded = load_model(opts.checkpoint, inline_clip=not opts.cached_clip,
                        given_clip=dict(opts.clip), device=opts.device, amp=opts.amp)
    size = data.size
    if size[0] % 32 or size[1] % 32:
        raise BadInputError(opts.prepared, f"prepared at {size[1]}x{size[0]}; SalMM needs"
                            " width and height that are multiples of 32")
    if size != loaded.size:
        log.warning("the checkpoint was trained at %dx%d, the prepared data is %dx%d",
                    loaded.size[1], loaded.size[0], size[1], size[0])
    cache_path = cache_identity = table = None
    if opts.cached_clip:
        cache_path, cache_identity = data.clip_cache(opts.cache, loaded.clip.identity(),
                                                     [opts.split])
        table = EmbeddingTable(cache_path, opts.split)
    return Inputs(data, frames, dataset, fixations, loaded, cache_path, cache_identity, table,
                  None, base)


def _protocol_base(data: PreparedDataset) -> np.ndarray | None:
    """The mean training label, the baseline of a protocol's information gain (None, and IG
    left undefined, without a train split or with every train label zero)."""
    try:
        return fit_baseline("mean", data).map.astype(np.float32)
    except BadInputError as err:
        log.warning("%s: no mean training label (%s); the protocol's IG is left undefined",
                    data.manifest_url, err.problem)
        return None


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
        samples = iter_samples(inputs.data, opts.split)
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
                source = tuple(meta.get("source_size") or FRAME_SIZE)
                fix = matlab_points(sample["fixations"], source) if inputs.fixations else None
                protocol = (None if inputs.protocol is None
                            else (inputs.protocol, inputs.protocol_base))
                collect(pool.submit(pred, label, fix, seeds, key, opts.jitter, protocol, source))
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
