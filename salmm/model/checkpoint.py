"""Training checkpoints: what they hold, atomic saving, safe loading.

A checkpoint is one ``torch.save`` file that loads with ``torch.load(..., weights_only=True)``:
it holds only tensors, numbers, strings, None, lists and dicts. Keys:

=================  ==========================================================================
epoch              completed epochs (int); the official checkpoints' key
state_dict         the model's weights, same key names as the authors' released checkpoints
optim_dict         the optimizer's ``state_dict()`` (official key)
valid_loss         validation loss of that epoch (float, official key)
format             ``"salmm-train-checkpoint"``; format_version 2 (1: trained on CLIP with GELU
                   and JPEG frames; refused)
step               optimizer steps taken so far (int)
best               ``{"epoch", "valid_loss"}`` of the best epoch so far (by validation loss)
history            one dict per completed epoch (the rows of ``metrics.csv``)
rng                generator states: ``torch`` (uint8 tensor), ``numpy``, ``python``, ``cuda``
                   (list of uint8 tensors, one per device; empty without CUDA)
config             the run's full options (:class:`salmm.training.config.TrainConfig` as a dict)
dataset_version    version id of the prepared dataset (``pipeline.formats.manifest.version_id``)
cache_identity     the CLIP cache's recorded header (None when CLIP ran inline)
git_commit         the project's git commit (None outside a git checkout)
world_size         training processes (1 without torchrun)
threads            CPU intra-op threads the run used (None on CUDA), reused on resume
stopped            None, or why the run stopped early (``{"reason", "epoch", "step"}``)
scan               the selective scan the Mamba blocks ran (``salmm.model.mamba.scan_backend``:
                   "mamba-ssm", "triton", "chunked", "numba"); absent in older checkpoints
=================  ==========================================================================
"""

from __future__ import annotations

import io
import pickle
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder

FORMAT = "salmm-train-checkpoint"
FORMAT_VERSION = 2
"""2: trained with the authors' CLIP (QuickGELU) on lossless frames. Format-1 checkpoints are
refused: their CLIP branch saw other numbers than the published model's."""
LISTED = 10  # offenders named per kind in an error message


def training_checkpoint(state_dict: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, *, epoch: int, step: int,
                        valid_loss: float, best: dict[str, Any], history: list[dict[str, float]],
                        config: dict[str, Any], version: str,
                        cache_identity: dict[str, Any] | None, commit: str | None,
                        threads: int | None = None, stopped: dict[str, Any] | None = None,
                        scan: str | None = None) -> dict[str, Any]:
    """The checkpoint dict of a training run (the keys are the table above), with the
    generator states of this process and the process group's size."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "state_dict": state_dict,
        "optim_dict": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "valid_loss": valid_loss,
        "step": step,
        "best": dict(best),
        "history": [dict(row) for row in history],
        "rng": rng_state(),
        "config": config,
        "dataset_version": version,
        "cache_identity": cache_identity,
        "git_commit": commit,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "threads": threads,
        "stopped": stopped,
        "scan": scan,
    }


def rng_state() -> dict[str, Any]:
    """The torch, numpy, python (and CUDA, if initialised) generator states, as tensors, numbers
    and lists only."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states saved by :func:`rng_state` (CUDA ones when both the
    checkpoint and this process have CUDA devices)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    nps = state["numpy"]
    np.random.set_state({
        "bit_generator": nps["bit_generator"],
        "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": nps["pos"]},
        "has_gauss": nps["has_gauss"],
        "gauss": nps["gauss"],
    })
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def git_commit(root: str | Path | None = None) -> str | None:
    """The commit checked out at ``root`` (default: this project's folder), or None when it is
    not a git checkout or git is unavailable."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` (local path or fsspec URL) atomically: a temporary file
    next to it, fsync'ed, then renamed, so ``path`` always holds a complete checkpoint."""
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    path = str(path)
    folder, _, name = path.rpartition("/")
    Folder(folder or ".").write_bytes(name, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; BadInputError (one line naming the file)
    when it is missing, unreadable or has no ``state_dict``."""
    path = str(path)
    folder, _, name = path.rpartition("/")
    store = Folder(folder or ".")
    if not store.exists(name):
        raise BadInputError(path, "no such checkpoint")
    try:
        with store.open(name) as f:
            checkpoint = torch.load(io.BytesIO(f.read()), map_location=map_location,
                                    weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInputError(path, f"not a readable checkpoint ({first})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise BadInputError(path, "not a checkpoint: it has no state_dict")
    if checkpoint.get("format") == FORMAT and checkpoint.get("format_version") != FORMAT_VERSION:
        raise BadInputError(path, f"salmm checkpoint format {checkpoint.get('format_version')},"
                            f" this salmm reads {FORMAT_VERSION} (format 1 was trained with"
                            " CLIP's GELU instead of the authors' QuickGELU, on JPEG frames);"
                            " train it again with `python -m salmm.train`")
    return checkpoint


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED])
    return shown + (f", ... and {len(keys) - LISTED} more" if len(keys) > LISTED else "")


def _offenders(weights: dict[str, Any], expected: dict[str, torch.Tensor]) -> list[str]:
    """One phrase per kind of mismatch between a checkpoint's weights and the model's."""
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    not_tensor = [k for k in weights if k in expected and not isinstance(weights[k], torch.Tensor)]
    shape = [
        f"{k} {list(weights[k].shape)} vs model {list(expected[k].shape)}"
        for k in weights
        if k in expected and k not in not_tensor and weights[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if extra:
        hint = ""
        if any(k.startswith("module.") for k in extra):
            hint = " [a 'module.' prefix: the authors save a plain module, strip the prefix]"
        problems.append(f"{len(extra)} unexpected ({_names(extra)}){hint}")
    if not_tensor:
        problems.append(f"{len(not_tensor)} not tensors ({_names(not_tensor)})")
    if shape:
        problems.append(f"{len(shape)} wrong shape ({_names(shape)})")
    return problems


def check_state_dict(path: str | Path, weights: dict[str, Any],
                     expected: dict[str, torch.Tensor]) -> None:
    """BadInputError (one line naming ``path`` and every offender) unless ``weights`` has
    exactly the keys of ``expected``, each a tensor of its shape."""
    problems = _offenders(weights, expected)
    if problems:
        raise BadInputError(path, "state_dict does not match SalMM: " + "; ".join(problems))
