"""``python -m salmm.train``: train SalM2 on a prepared dataset.

With ``--cached-clip`` the CLIP embedding of every frame (and of its mirror image) comes from
the cache ``python -m pipeline embed`` wrote, so a step runs only the 76k-parameter model;
without it the model runs its frozen CLIP inline, as the published code does.

The run, top to bottom:

1. Options (:mod:`salmm.options`), processes (one, or one per GPU under ``torchrun``: DDP,
   the permutation split by rank), device and autocast (off unless ``--amp``), one writer of
   the run folder at a time.
2. Inputs checked before any step: the prepared dataset's manifest and frame size, the CLIP
   cache's dataset version, model, profile and weights; a resumed checkpoint's dataset, cache
   and recipe. A mismatch stops the run with one line.
3. Per epoch: train (``nn.BCELoss`` on the saliency map, Adam, as published, on a fresh
   permutation of the split, in float32 with a fixed thread count), validate (loss, CC, SIM,
   KLD from :mod:`salmm.evaluation.metrics`), write ``last.pt`` (and ``best.pt`` on a new best validation
   loss) atomically, ``metrics.csv``, TensorBoard events under ``tb/`` and ``curves.png``.
4. A non-finite prediction, loss or gradient stops the run before the bad step reaches the
   weights, saving ``last-good.pt`` (every tensor in it finite).

Run folder: ``last.pt``, ``best.pt``, ``metrics.csv``, ``curves.png``, ``tb/``, ``train.log``,
``config.json``. ``--resume RUN/last.pt`` continues exactly: every random decision of an epoch
derives from (seed, epoch) and the generator states are restored, so an interrupted and resumed
run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
import os
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from pipeline.core import cpu
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.progress import progress, track
from pipeline.encoders.clip import RANDOM_NOTE
from pipeline.formats import clip_cache
from pipeline.formats.manifest import read_manifest, version_id
from pipeline.formats.shard_index import SampleReader, read_index
from pipeline.formats.shards import split_shards
from salmm.data.stages import (
    EmbeddingTable,
    EpochBatches,
    IndexedSamples,
    SaliencyShards,
    make_indexed_loader,
    make_loader,
)
from salmm.evaluation import metrics
from salmm.model.checkpoint import (
    FORMAT,
    check_state_dict,
    git_commit,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    training_checkpoint,
)
from salmm.model.devices import autocast, autocast_dtype
from salmm.model.net import build_model as model_factory
from salmm.options import RECIPE_FIELDS, TrainConfig, parse_args, run_command
from salmm.render.plots import plot_history

log = logging.getLogger("salmm.train")

VALID_METRICS = ("CC", "SIM", "KLD")
DEFAULT_TRAIN_THREADS = 1
"""CPU intra-op threads of a run without ``--threads``: fixed, so the numbers never depend on
the machine's load at start; one thread also never waits for a core that another process
holds (the data workers decode on the other cores)."""
CSV_COLUMNS = ("epoch", "step", "train_loss", "valid_loss", *VALID_METRICS, "lr",
               "train_samples", "train_seconds", "train_samples_per_s", "valid_samples",
               "valid_seconds", "valid_undefined")


class NonFinite(ValueError):
    """A prediction, loss or gradient that is NaN or infinite (what, in the message)."""


class NonFiniteLoss(RuntimeError):
    """The training loss, a prediction or a gradient became NaN or infinite in ``epoch``
    (0-based) after ``step`` good optimizer steps; the bad step was not taken."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


# ---- processes, device, precision --------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank among ``world_size`` processes, its device and the
    autocast dtype (None: full float32)."""

    rank: int
    world_size: int
    device: torch.device
    autocast: torch.dtype | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the ``torchrun`` process group when there is one (NCCL on CUDA, gloo on CPU) and pick
    this process's device and autocast dtype."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank = 0
    if world_size > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    # float32 as published: PyTorch's defaults (no TF32 matrix products; cuDNN's convolutions
    # as the authors' PyTorch 2.2 ran them) unless --amp asks for a faster precision
    return Runtime(rank, world_size, device, autocast_dtype(cfg.amp, device))


# ---- loss --------------------------------------------------------------------------------------


def bce_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy of a predicted map ``pred`` in [0, 1] against ``target``
    in [0, 1] (equal shapes, float32): ``torch.nn.BCELoss(reduction="none")`` itself, forward
    and backward (its log terms are clamped at -100 inside the kernel, so a prediction
    saturated at exactly 0 or 1 has a finite gradient). NonFinite for a NaN or infinite
    prediction, which BCELoss would refuse with an error."""
    return nn.functional.binary_cross_entropy(_finite_prediction(pred), target,
                                              reduction="none")


def bce_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss, the authors' ``nn.BCELoss()``: the mean of :func:`bce_map`."""
    return nn.functional.binary_cross_entropy(_finite_prediction(pred), target)


def _finite_prediction(pred: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(pred).all()):
        raise NonFinite("non-finite prediction")
    return pred


def finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every element of every tensor given (None skipped) is finite."""
    flat = [t.detach().reshape(-1).float() for t in tensors if t is not None]
    return not flat or bool(torch.isfinite(torch.cat(flat)).all())


def state_is_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight and every optimizer state tensor is finite: what a state must be
    to be called good."""
    moments = [v for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return finite(model.parameters()) and finite(moments)


# ---- inputs ------------------------------------------------------------------------------------


def check_prepared(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """BadInputError unless the prepared data has train and valid samples at the run's size."""
    size = manifest.get("options", {}).get("size", {})
    prepared = (size.get("height"), size.get("width"))
    if prepared != tuple(cfg.size):
        raise BadInputError(cfg.prepared, f"prepared at {prepared[1]}x{prepared[0]} (width x"
                            f" height) but the run asks --size {cfg.size[1]}x{cfg.size[0]}; pass"
                            f" --size {prepared[1]}x{prepared[0]} or prepare that size with"
                            " `python -m pipeline normalize --size`")
    for split in ("train", "valid"):
        if not manifest["splits"].get(split, {}).get("samples"):
            raise BadInputError(cfg.prepared, f"has no {split} samples; training needs train"
                                " and valid splits")


def open_checked_cache(cfg: TrainConfig, manifest: dict[str, Any],
                       splits: Sequence[str] = ("train", "valid")) -> tuple[str, dict[str, Any]]:
    """(path, identity) of the run's CLIP cache after checking it was made from this prepared
    dataset version with the run's CLIP model, profile and weights, and holds ``splits``."""
    return clip_cache.open_checked_cache(cfg.cache, cfg.prepared, manifest,
                                         cfg.clip.identity(), splits)


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """SalMM on ``device``: without CLIP (embeddings passed in) for ``--cached-clip``, else with
    its frozen CLIP encoder built from the run's CLIP options (BadInputError, one line, when
    the weights cannot be had)."""
    return model_factory(cached_clip=cfg.cached_clip, clip=cfg.clip, device=device)


def pin_threads(cfg: TrainConfig, rt: Runtime, checkpoint: dict[str, Any] | None) -> int | None:
    """Fix torch's intra-op thread count for the whole run (CPU training; None on CUDA).

    Torch's reductions round differently with the thread count, so the count is part of the
    recipe and never taken from the machine's load: ``--threads``, else the resumed
    checkpoint's, else :data:`DEFAULT_TRAIN_THREADS`. The same command then gives the same
    weights on any machine of the same kind, busy or idle (busy: slower, not different).
    Setting it also stops the model's own thread adaptation.
    """
    if rt.device.type != "cpu":
        return None
    recorded = checkpoint.get("threads") if checkpoint is not None else None
    threads = cfg.threads or recorded or DEFAULT_TRAIN_THREADS
    if recorded is not None and threads != recorded:
        log.warning("resuming with %d intra-op threads, the checkpoint had %d: float rounding"
                    " changes, so the run will not repeat an uninterrupted one exactly",
                    threads, recorded)
    cpu.set_threads(threads)
    return threads


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names: DDP wrapper removed; SalMM's
    state_dict already leaves its frozen CLIP encoder out."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return module.state_dict()


def check_resume(checkpoint: dict[str, Any], path: str, cfg: TrainConfig, version: str,
                 cache_identity: dict[str, Any] | None) -> None:
    """BadInputError (one line) unless ``checkpoint`` was made by this trainer on the same
    dataset version, CLIP cache and recipe as this run."""
    if checkpoint.get("format") != FORMAT:
        raise BadInputError(path, "not a salmm training checkpoint (an official release?);"
                            " it can be evaluated but not resumed")
    missing = [k for k in ("config", "dataset_version", "cache_identity", "optim_dict", "epoch",
                           "step", "history", "best", "rng") if k not in checkpoint]
    if missing or not isinstance(checkpoint["config"], dict) \
            or any(k not in checkpoint["config"] for k in RECIPE_FIELDS + ("workers",)):
        raise BadInputError(path, "not a complete salmm training checkpoint (missing"
                            f" {', '.join(missing) or 'config fields'}); it cannot be resumed")
    if checkpoint["dataset_version"] != version:
        raise BadInputError(path, f"trained on prepared dataset version"
                            f" {checkpoint['dataset_version']}, this run's data is version"
                            f" {version}")
    if checkpoint["cache_identity"] != cache_identity:
        raise BadInputError(path, "trained with another CLIP cache (or CLIP mode) than this run")
    old = checkpoint["config"]
    new = cfg.as_dict()
    changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {new[k]!r}" for k in RECIPE_FIELDS
               if old[k] != new[k]]
    if changed:
        raise BadInputError(path, f"trained with other options ({'; '.join(changed)}); resume"
                            " with the same options")


# ---- one epoch ---------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], rt: Runtime) -> tuple[torch.Tensor, ...]:
    """frame uint8 -> float [B, 3, H, W] in [0, 1], label [B, 1, H, W], emb [B, D] or None."""
    frames = batch["frame"].to(rt.device, non_blocking=True).float().div_(255)
    labels = batch["label"].to(rt.device, non_blocking=True)
    emb = batch["emb"].to(rt.device, non_blocking=True) if "emb" in batch else None
    return frames, labels, emb


def _autocast(rt: Runtime):
    return autocast(rt.device, rt.autocast)


def _all_reduce(values: list[float], rt: Runtime) -> list[float]:
    """Sum ``values`` over all processes (float64)."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class EpochResult:
    """What :func:`train_epoch` did."""

    loss: float          # mean BCE over the epoch's samples (all processes)
    samples: int         # samples trained on (all processes)
    seconds: float
    step: int            # optimizer steps taken so far


def train_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, steps: int | None,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rt: Runtime,
                step: int, epoch: int, epochs: int, total: int,
                tb: Any | None) -> EpochResult:
    """One pass over the loader (at most ``steps`` batches when given). Raises NonFiniteLoss
    before the optimizer step of a batch whose loss (on any process) is not finite."""
    model.train()
    loss_sum, count = 0.0, 0
    start = time.perf_counter()
    bar = progress(total=total, unit="sample", desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not rt.main, leave=False)
    with bar:
        for i, batch in enumerate(loader):
            if steps is not None and i >= steps:
                break
            frames, labels, emb = _to_device(batch, rt)
            with _autocast(rt):
                pred = model(frames, emb)                      # [B, 1, H, W] in (0, 1)
            try:
                loss = bce_loss(pred.float(), labels)
                problem = None
            except NonFinite as err:
                loss, problem = None, str(err)
            n = labels.shape[0]
            batch_sum, batch_n = _all_reduce(
                [math.nan if loss is None else loss.item() * n, float(n)], rt)
            if not math.isfinite(batch_sum):
                raise NonFiniteLoss(f"{problem or 'non-finite training loss'}"
                                    f" ({batch_sum / batch_n}) at epoch {epoch + 1}, step"
                                    f" {step + 1}", epoch, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # a float16 run's scaler skips steps with overflowing gradients by design; any other
            # non-finite gradient stops the run before it reaches the weights
            bad_grad = not scaler.is_enabled() and not finite(p.grad for p in model.parameters())
            if _all_reduce([float(bad_grad)], rt)[0]:
                raise NonFiniteLoss(f"non-finite gradient at epoch {epoch + 1}, step {step + 1}"
                                    f" (loss {batch_sum / batch_n:.6g})", epoch, step)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_sum += batch_sum
            count += int(batch_n)
            bar.update(n)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}")
            if tb is not None:
                tb.add_scalar("train/loss_step", batch_sum / batch_n, step)
    seconds = time.perf_counter() - start
    return EpochResult(loss_sum / max(count, 1), count, seconds, step)


@torch.inference_mode()
def validate(model: nn.Module, loader: torch.utils.data.DataLoader, rt: Runtime
             ) -> dict[str, float]:
    """Validation loss and the mean CC, SIM, KLD per frame (:func:`salmm.evaluation.metrics.evaluate_frame`,
    the official evaluation's per-frame scores) over all processes' samples, and their count
    (``valid_loss``, ``CC``, ``SIM``, ``KLD``, ``valid_samples``). A metric undefined on a frame
    (NaN: an all-zero label has no distribution to compare with) is left out of its mean;
    ``valid_undefined`` counts the frames on which any of them was."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    module.eval()
    rng = np.random.default_rng(0)          # evaluate_frame draws only for the fixation metrics
    sums = dict.fromkeys(("loss", *VALID_METRICS), 0.0)
    defined = dict.fromkeys(VALID_METRICS, 0)
    count = undefined = 0
    for batch in track(loader, desc="validate", unit="batch", disable=not rt.main, leave=False):
        frames, labels, emb = _to_device(batch, rt)
        with _autocast(rt):
            pred = module(frames, emb)
        pred = pred.float()
        sums["loss"] += bce_map(pred, labels).flatten(1).mean(1).sum().item()
        for p, t in zip(pred[:, 0].double().cpu().numpy(), labels[:, 0].double().cpu().numpy()):
            scores = metrics.evaluate_frame(p, t, None, rng=rng)
            undefined += any(math.isnan(scores[name]) for name in VALID_METRICS)
            for name in VALID_METRICS:
                if not math.isnan(scores[name]):
                    sums[name] += scores[name]
                    defined[name] += 1
        count += labels.shape[0]
    reduced = _all_reduce(
        [*sums.values(), float(count), float(undefined), *map(float, defined.values())], rt)
    loss, *metric_sums = reduced[:len(sums)]
    n, bad = reduced[len(sums):len(sums) + 2]
    counts = reduced[len(sums) + 2:]
    out = {"valid_loss": loss / n}
    out.update({name: total / k if k else math.nan
                for name, total, k in zip(VALID_METRICS, metric_sums, counts)})
    return {**out, "valid_samples": int(n), "valid_undefined": int(bad)}


def warn_if_crowded(load: cpu.ThreadGovernor, threads: int | None) -> bool:
    """Warn when other processes took cores the run's threads need since the last look (every
    operator then waits for a thread that has no core, several times slower); whether it did."""
    free = load.free_cores()
    if threads is None or free is None or cpu.threads_for(free, threads) >= threads:
        return False
    log.warning("other processes now use about %.1f of the %d cores this run trains on with %d"
                " threads: steps wait for threads that have no core; the run keeps %d threads"
                " so that it stays exact; to use fewer, stop it and resume with --threads %d",
                max(0.0, cpu.usable_cores() - free), cpu.usable_cores(), threads, threads,
                cpu.threads_for(free, threads))
    return True


# ---- records -----------------------------------------------------------------------------------


def write_csv(path: Path, history: Sequence[dict[str, float]]) -> None:
    """``metrics.csv``: one row per epoch (rewritten whole, atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k) for k in CSV_COLUMNS})
    Folder(path.parent).write_bytes(path.name, buf.getvalue().encode())


def _log_to_file(run: Path) -> logging.Handler:
    """Copy this module's INFO messages to ``run/train.log`` (whatever the root logger's level)."""
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def _run_folder(cfg: TrainConfig, rt: Runtime) -> Path:
    """--out, else the resumed checkpoint's folder, else runs/<date>-<time> (chosen by rank 0)."""
    if cfg.out:
        return Path(cfg.out)
    if cfg.resume:
        return Path(cfg.resume).parent
    name = [datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
    if rt.distributed:
        dist.broadcast_object_list(name, src=0)
    return Path("runs") / name[0]


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A run's inputs, checked: the prepared data's manifest and version, the CLIP cache (None
    with inline CLIP) and the checkpoint resumed from (None for a new run)."""

    manifest: dict[str, Any]
    version: str
    cache_path: str | None
    cache_identity: dict[str, Any] | None
    checkpoint: dict[str, Any] | None


def open_inputs(cfg: TrainConfig, rt: Runtime) -> Inputs:
    """Every input of the run, checked before anything is built (BadInputError, one line)."""
    manifest = read_manifest(cfg.prepared)
    version = version_id(manifest)
    check_prepared(cfg, manifest)
    cache_path, cache_identity = (open_checked_cache(cfg, manifest) if cfg.cached_clip
                                  else (None, None))
    checkpoint = load_checkpoint(cfg.resume) if cfg.resume else None
    if checkpoint is not None:
        check_resume(checkpoint, cfg.resume, cfg, version, cache_identity)
        if cfg.order == "stream" and (checkpoint["config"]["workers"], checkpoint["world_size"]
                                      ) != (cfg.workers, rt.world_size):
            log.warning("resuming with %d data workers x %d processes, the checkpoint had %d x %d:"
                        " the sample order changes, so the run will not repeat an uninterrupted"
                        " one exactly", cfg.workers, rt.world_size,
                        checkpoint["config"]["workers"], checkpoint["world_size"])
    return Inputs(manifest, version, cache_path, cache_identity, checkpoint)


@dataclass
class State:
    """What an epoch changes: the model (DDP-wrapped on several processes), optimizer and loss
    scaler, the next epoch and the steps taken, the rows of ``metrics.csv`` and the best epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "valid_loss": math.inf})


def build_state(cfg: TrainConfig, rt: Runtime, checkpoint: dict[str, Any] | None) -> State:
    """A new run's state from ``cfg.seed``, or the resumed checkpoint's, every generator
    included (BadInputError, one line, when the checkpoint does not fit the model)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg, rt.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all ~600 parameter tensors (CPU and CUDA), 6x faster than the loop
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast == torch.float16)
    state = State(model, optimizer, scaler)
    if checkpoint is not None:
        check_state_dict(cfg.resume, checkpoint["state_dict"], model_state(model))
        model.load_state_dict(checkpoint["state_dict"])
        try:
            optimizer.load_state_dict(checkpoint["optim_dict"])
        except (ValueError, KeyError, TypeError) as err:
            raise BadInputError(cfg.resume, f"optimizer state does not fit the model ({err})"
                                ) from None
        if checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        state.epoch, state.step = checkpoint["epoch"], checkpoint["step"]
        state.history, state.best = list(checkpoint["history"]), dict(checkpoint["best"])
        set_rng_state(checkpoint["rng"])
    if rt.distributed:
        # DDP warns once that a [1, 1, 3] conv weight's grad strides differ from its bucket's;
        # they differ only along size-1 dimensions, which changes no memory layout
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        state.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    return state


class Records:
    """The run folder's records, written by the main process only: ``config.json`` and
    ``train.log`` at the start, a checkpoint, ``metrics.csv``, ``curves.png`` and TensorBoard
    events per epoch. A context manager: closing it closes the log file and the events."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, run: Path, inputs: Inputs,
                 threads: int | None, step: int) -> None:
        self.cfg, self.rt, self.run, self.inputs, self.threads = cfg, rt, run, inputs, threads
        self.commit = git_commit()
        self.tb: Any = None
        self.log_file: logging.Handler | None = None
        if rt.main:
            run.mkdir(parents=True, exist_ok=True)
            self.log_file = _log_to_file(run)
            Folder(run).write_bytes("config.json", json.dumps(
                {"config": cfg.as_dict(), "dataset_version": inputs.version,
                 "cache": inputs.cache_path, "cache_identity": inputs.cache_identity,
                 "git_commit": self.commit, "world_size": rt.world_size,
                 "note": RANDOM_NOTE if cfg.clip.random else None}, indent=1).encode())
            # purge_step drops events a killed run wrote after its last checkpoint
            self._hook = threading.excepthook       # before the writer's thread starts
            threading.excepthook = _quiet_event_writer(self._hook)
            try:
                self.tb = SummaryWriter(str(run / "tb"), purge_step=step if step > 0 else None)
            except BaseException:
                threading.excepthook = self._hook
                raise

    def save(self, name: str, state: State, **extra: Any) -> None:
        """Checkpoint ``name`` of ``state`` (``extra``: epoch, step, valid_loss, stopped)."""
        if self.rt.main:
            save_checkpoint(self.run / name, training_checkpoint(
                model_state(state.model), state.optimizer, state.scaler, best=state.best,
                history=state.history, config=self.cfg.as_dict(), version=self.inputs.version,
                cache_identity=self.inputs.cache_identity, commit=self.commit,
                threads=self.threads, **extra))

    def epoch(self, state: State, row: dict[str, float]) -> None:
        """``metrics.csv``, ``curves.png`` and the epoch's TensorBoard scalars."""
        if self.rt.main:
            write_csv(self.run / "metrics.csv", state.history)
            plot_history(state.history, self.run / "curves.png")
            for key in ("train_loss", "valid_loss", *VALID_METRICS, "train_samples_per_s"):
                self.tb.add_scalar(f"epoch/{key}", row[key], state.step)
            self.tb.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tb is not None:
            try:
                self.tb.close()
            finally:
                threading.excepthook = self._hook
        if self.log_file is not None:
            log.removeHandler(self.log_file)
            self.log_file.close()


def _quiet_event_writer(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``threading.excepthook`` that stays silent when TensorBoard's background event writer
    fails to write (a full disk, no permission): it hands the same error to the next
    ``flush`` the trainer makes, which reports it as one line. Other threads go to
    ``previous``."""
    def hook(args: Any) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and args.exc_type is not None \
                and issubclass(args.exc_type, OSError):
            return
        previous(args)
    return hook


def fit(cfg: TrainConfig, rt: Runtime, state: State, loaders: dict[str, Any],
        records: Records) -> None:
    """The epochs from ``state.epoch`` to ``cfg.epochs``: train, validate, record. A diverging
    loss saves ``last-good.pt`` and raises NonFiniteLoss."""
    load, warned = cpu.ThreadGovernor(interval_s=1.0), False
    for epoch in range(state.epoch, cfg.epochs):
        steps, total = start_epoch(loaders["train"], epoch, cfg, rt)
        try:
            result = train_epoch(state.model, loaders["train"], steps, state.optimizer,
                                 state.scaler, rt, state.step, epoch, cfg.epochs, total, records.tb)
        except NonFiniteLoss as err:
            if not state_is_finite(state.model, state.optimizer):
                raise NonFiniteLoss(f"{err}; stopped, and the weights in memory are not finite,"
                                    " so no last-good.pt was written (the last checkpoint is"
                                    f" {records.run / 'last.pt'})", epoch, err.step) from None
            valid_loss = state.history[-1]["valid_loss"] if state.history else math.nan
            records.save("last-good.pt", state, epoch=epoch, step=err.step, valid_loss=valid_loss,
                         stopped={"reason": str(err), "epoch": epoch + 1, "step": err.step + 1})
            raise NonFiniteLoss(f"{err}; stopped, the last good state is in"
                                f" {records.run / 'last-good.pt'}", epoch, err.step) from None
        state.step = result.step
        v_start = time.perf_counter()
        scores = validate(state.model, loaders["valid"], rt)
        row = {"epoch": epoch + 1, "step": state.step, "train_loss": result.loss, **scores,
               "lr": state.optimizer.param_groups[0]["lr"], "train_samples": result.samples,
               "train_seconds": result.seconds,
               "train_samples_per_s": result.samples / max(result.seconds, 1e-9),
               "valid_seconds": time.perf_counter() - v_start}
        state.history.append(row)
        state.epoch = epoch + 1
        if scores["valid_loss"] < state.best["valid_loss"]:
            state.best = {"epoch": epoch + 1, "valid_loss": scores["valid_loss"]}
            records.save("best.pt", state, epoch=epoch + 1, step=state.step,
                         valid_loss=scores["valid_loss"])
        records.save("last.pt", state, epoch=epoch + 1, step=state.step,
                     valid_loss=scores["valid_loss"])
        records.epoch(state, row)
        log_epoch(cfg, row)
        warned = warned or warn_if_crowded(load, records.threads)
        if rt.distributed:
            dist.barrier()


def start_epoch(loader: torch.utils.data.DataLoader, epoch: int, cfg: TrainConfig,
                rt: Runtime) -> tuple[int | None, int]:
    """Make the training loader draw epoch ``epoch``; (the steps every process takes, None when
    the loader gives every process as many; the samples this process reads)."""
    if isinstance(loader.batch_sampler, EpochBatches):
        loader.batch_sampler.set_epoch(epoch)
        return None, loader.batch_sampler.per_rank
    shards = loader.dataset
    shards.set_epoch(epoch)
    total = shards.samples_in_epoch(rt.rank, rt.world_size, epoch)
    if not rt.distributed:
        return None, total
    # DDP needs the same number of steps on every process
    steps = min(shards.batches_in_epoch(epoch, cfg.workers, r, rt.world_size)
                for r in range(rt.world_size))
    return steps, min(total, steps * cfg.batch_size)


def training_loader(cfg: TrainConfig, rt: Runtime, inputs: Inputs) -> torch.utils.data.DataLoader:
    """The training split's loader in the run's order: a permutation per epoch by random access
    (embeddings preloaded), or streamed shards through a shuffle buffer."""
    shards = split_shards(cfg.prepared, inputs.manifest, "train")
    pin = rt.device.type == "cuda"
    if cfg.order == "stream":
        data = SaliencyShards(shards, split="train", train=True, seed=cfg.seed,
                              batch_size=cfg.batch_size, size=cfg.size,
                              shuffle_buffer=cfg.shuffle_buffer, cache_path=inputs.cache_path)
        return make_loader(data, cfg.workers, pin, cfg.seed)
    table = None
    if inputs.cache_path is not None:
        table = EmbeddingTable(inputs.cache_path, "train")
        table.preload()
    reader = SampleReader(shards, read_index(cfg.prepared, inputs.manifest, "train"))
    batches = EpochBatches(len(reader), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    samples = IndexedSamples(reader, seed=cfg.seed, size=cfg.size, table=table)
    return make_indexed_loader(samples, batches, cfg.workers, pin, cfg.seed)


def log_epoch(cfg: TrainConfig, row: dict[str, float]) -> None:
    """The epoch's line in the log."""
    undefined = (f" ({row['valid_undefined']} of {row['valid_samples']} validation frames"
                 " skipped: all-zero label)" if row["valid_undefined"] else "")
    log.info("epoch %d/%d: train loss %.5f, valid loss %.5f, CC %.4f, SIM %.4f, KLD %.4f%s,"
             " %.3g samples/s", row["epoch"], cfg.epochs, row["train_loss"], row["valid_loss"],
             row["CC"], row["SIM"], row["KLD"], undefined, row["train_samples_per_s"])


def train(cfg: TrainConfig) -> Path:
    """Run the training ``cfg`` describes; returns the run folder. Raises BadInputError for bad
    inputs and NonFiniteLoss (after saving ``last-good.pt``) when the loss diverges."""
    rt = setup_runtime(cfg)
    if not rt.main:
        log.setLevel(logging.WARNING)       # one process reports progress
    try:
        return _train(cfg, rt)
    finally:
        if rt.distributed:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rt: Runtime) -> Path:
    inputs = open_inputs(cfg, rt)
    run = _run_folder(cfg, rt)
    # one writer per run folder (the lock normalize and embed take); other ranks write nothing
    if not rt.main:
        return _train_into(cfg, rt, inputs, run)
    with Folder(run).lock(subject=str(run)):
        Folder(run).remove_unfinished()     # a killed run's temporaries: no one else writes here
        return _train_into(cfg, rt, inputs, run)


def _train_into(cfg: TrainConfig, rt: Runtime, inputs: Inputs, run: Path) -> Path:
    if inputs.checkpoint is None and (run / "last.pt").exists():
        raise BadInputError(run, "already holds a run (last.pt); pass --resume"
                            f" {run / 'last.pt'} or another --out")
    threads = pin_threads(cfg, rt, inputs.checkpoint)
    state = build_state(cfg, rt, inputs.checkpoint)
    valid = SaliencyShards(split_shards(cfg.prepared, inputs.manifest, "valid"), split="valid",
                           train=False, seed=cfg.seed, batch_size=cfg.batch_size, size=cfg.size,
                           cache_path=inputs.cache_path)
    loaders = {"train": training_loader(cfg, rt, inputs),
               "valid": make_loader(valid, cfg.workers, rt.device.type == "cuda", cfg.seed)}
    with Records(cfg, rt, run, inputs, threads, state.step) as records:
        log.info("run %s: %s CLIP, %s order, %d process(es) on %s%s, %s, epochs %d..%d", run,
                 "cached" if cfg.cached_clip else "inline", cfg.order, rt.world_size, rt.device,
                 f" ({threads} intra-op thread(s))" if threads else "",
                 f"autocast {rt.autocast}" if rt.autocast else "float32", state.epoch + 1,
                 cfg.epochs)
        if cfg.clip.random:
            log.warning("CLIP weights are random (--clip-pretrained none): %s", RANDOM_NOTE)
        fit(cfg, rt, state, loaders, records)
        log.info("done: best validation loss %.5f at epoch %s; checkpoints in %s",
                 state.best["valid_loss"], state.best["epoch"], run)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: bad input, 3: loss diverged)."""
    cfg = parse_args(argv)
    return run_command(lambda: train(cfg), {NonFiniteLoss: 3})


if __name__ == "__main__":
    sys.exit(main())
