"""The loss and one epoch: train (``nn.BCELoss`` on the saliency map, Adam, as published) and
validate (loss, CC, SIM, KLD per frame, the official evaluation's scores).

A NaN or infinite prediction, loss or gradient raises :class:`NonFiniteLoss` before the bad step
reaches the weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.progress import progress, track
from salmm.data.stages import EpochBatches
from salmm.evaluation import metrics
from salmm.training.config import TrainConfig
from salmm.training.runtime import Runtime, _all_reduce, _autocast, _to_device

log = logging.getLogger("salmm.train")     # one logger for the run: train.log holds it all

VALID_METRICS = ("CC", "SIM", "KLD")


class NonFinite(ValueError):
    """A prediction, loss or gradient that is NaN or infinite (what, in the message)."""


class NonFiniteLoss(RuntimeError):
    """The training loss, a prediction or a gradient became NaN or infinite in ``epoch``
    (0-based) after ``step`` good optimizer steps; the bad step was not taken."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


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


def log_epoch(cfg: TrainConfig, row: dict[str, float]) -> None:
    """The epoch's line in the log."""
    undefined = (f" ({row['valid_undefined']} of {row['valid_samples']} validation frames"
                 " skipped: all-zero label)" if row["valid_undefined"] else "")
    log.info("epoch %d/%d: train loss %.5f, valid loss %.5f, CC %.4f, SIM %.4f, KLD %.4f%s,"
             " %.3g samples/s", row["epoch"], cfg.epochs, row["train_loss"], row["valid_loss"],
             row["CC"], row["SIM"], row["KLD"], undefined, row["train_samples_per_s"])
