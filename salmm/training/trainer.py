"""A training run, top to bottom.

1. Processes, device, autocast (:mod:`.runtime`); one writer of the run folder at a time.
2. Inputs checked before any step (:mod:`.inputs`).
3. Per epoch (:mod:`.loop`): train on a fresh permutation of the split, validate, write
   ``last.pt`` (and ``best.pt`` on a new best validation loss) atomically, ``metrics.csv``,
   TensorBoard events and ``curves.png`` (:mod:`.records`).
4. A non-finite prediction, loss or gradient stops the run before the bad step reaches the
   weights, saving ``last-good.pt`` (every tensor in it finite).

``--resume RUN/last.pt`` continues exactly: every random decision of an epoch derives from
(seed, epoch) and the generator states are restored, so an interrupted and resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.core import cpu
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.encoders.clip_spec import RANDOM_WARNING
from salmm.data.stages import SaliencyShards, make_loader
from salmm.model.checkpoint import check_state_dict, set_rng_state
from salmm.model.mamba import scan_backend
from salmm.model.net import build_model as model_factory
from salmm.training.config import TrainConfig
from salmm.training.inputs import Inputs, open_inputs, training_loader
from salmm.training.loop import (
    NonFiniteLoss,
    log_epoch,
    start_epoch,
    state_is_finite,
    train_epoch,
    validate,
)
from salmm.training.records import Records, _run_folder, model_state
from salmm.training.runtime import Runtime, pin_threads, setup_runtime, warn_if_crowded

log = logging.getLogger("salmm.train")     # one logger for the run: train.log holds it all


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


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """SalMM on ``device``: without CLIP (embeddings passed in) for ``--cached-clip``, else with
    its frozen CLIP encoder built from the run's CLIP options (BadInputError, one line, when
    the weights cannot be had)."""
    return model_factory(cached_clip=cfg.cached_clip, clip=cfg.clip, device=device)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The run's Adam (``cfg.lr``, ``cfg.weight_decay``) over the model's trainable parameters
    (the frozen CLIP's are not), fused: one kernel for all ~600 parameter tensors (CPU and
    CUDA), 6x faster than the loop."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def build_state(cfg: TrainConfig, rt: Runtime, checkpoint: dict[str, Any] | None) -> State:
    """A new run's state from ``cfg.seed``, or the resumed checkpoint's, every generator
    included (BadInputError, one line, when the checkpoint does not fit the model)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg, rt.device)
    optimizer = build_optimizer(cfg, model)
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
    valid = SaliencyShards(inputs.data.shards("valid"), split="valid",
                           train=False, seed=cfg.seed, batch_size=cfg.batch_size, size=cfg.size,
                           cache_path=inputs.cache_path)
    loaders = {"train": training_loader(cfg, rt, inputs),
               "valid": make_loader(valid, cfg.workers, rt.device.type == "cuda", cfg.seed)}
    with Records(cfg, rt, run, inputs, threads, state.step) as records:
        log.info("run %s: %s CLIP, %s order, %d process(es) on %s%s, %s scan, %s, epochs %d..%d",
                 run, "cached" if cfg.cached_clip else "inline", cfg.order, rt.world_size,
                 rt.device, f" ({threads} intra-op thread(s))" if threads else "",
                 scan_backend(rt.device),
                 f"autocast {rt.autocast}" if rt.autocast else "float32", state.epoch + 1,
                 cfg.epochs)
        if cfg.clip.random:
            log.warning("%s", RANDOM_WARNING)
        fit(cfg, rt, state, loaders, records)
        log.info("done: best validation loss %.5f at epoch %s; checkpoints in %s",
                 state.best["valid_loss"], state.best["epoch"], run)
    return run
