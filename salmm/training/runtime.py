"""Where a run trains: its processes (one, or one per GPU under ``torchrun``: DDP), device,
autocast dtype and CPU threads, and the sums across processes.

The thread count is part of the recipe (torch's reductions round differently with it): never
taken from the machine's load, and a warning when other processes crowd the run's cores.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.core import cpu
from salmm.model.devices import autocast, autocast_dtype
from salmm.training.config import DEFAULT_TRAIN_THREADS, TrainConfig

log = logging.getLogger("salmm.train")     # one logger for the run: train.log holds it all


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
