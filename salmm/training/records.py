"""The run folder's records: ``config.json``, ``train.log``, checkpoints, ``metrics.csv``,
``curves.png`` and TensorBoard events under ``tb/``, written by the main process only.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from pipeline.core.fsio import Folder
from pipeline.encoders.clip_spec import RANDOM_NOTE
from salmm.model.checkpoint import git_commit, save_checkpoint, training_checkpoint
from salmm.model.mamba import scan_backend
from salmm.render.overlay import caveat
from salmm.render.plots import plot_history
from salmm.training.config import TrainConfig
from salmm.training.inputs import Inputs
from salmm.training.loop import VALID_METRICS
from salmm.training.runtime import Runtime

if TYPE_CHECKING:
    from salmm.training.trainer import State

log = logging.getLogger("salmm.train")     # one logger for the run: train.log holds it all

CSV_COLUMNS = ("epoch", "step", "train_loss", "valid_loss", *VALID_METRICS, "lr",
               "train_samples", "train_seconds", "train_samples_per_s", "valid_samples",
               "valid_seconds", "valid_undefined")


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


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names: DDP wrapper removed; SalMM's
    state_dict already leaves its frozen CLIP encoder out."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return module.state_dict()


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
                 "scan": scan_backend(rt.device),
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
                threads=self.threads, scan=scan_backend(self.rt.device), **extra))

    def epoch(self, state: State, row: dict[str, float]) -> None:
        """``metrics.csv``, ``curves.png`` and the epoch's TensorBoard scalars."""
        if self.rt.main:
            write_csv(self.run / "metrics.csv", state.history)
            plot_history(state.history, self.run / "curves.png",
                         caveat(self.inputs.data.synthetic, self.cfg.clip.random))
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
