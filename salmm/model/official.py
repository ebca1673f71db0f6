"""The authors' released SalM^2 checkpoints, read and written key for key.

``model_best_salmm_<dataset>_256x256_incomplete.tar`` is a ``torch.save`` dict
``{"epoch", "state_dict", "optim_dict", "valid_loss"}`` written by the authors' ``train.py``
(a plain ``model.state_dict()``: no DataParallel ``module.`` prefix) with the frozen CLIP
weights (``CrossModelAtt.model.*``) stripped. :func:`load_official` accepts exactly the
published trainable layout; CLIP keys are ignored when present (a "complete" checkpoint) and
never required. Anything else - a missing, extra or mis-shaped key - is refused with one line
naming the file and every offender.

``salmm official CKPT [--check]`` (:mod:`salmm.official`) confirms a file from the command line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.core.errors import BadInputError
from salmm.model.checkpoint import check_state_dict, load_checkpoint, save_checkpoint
from salmm.model.net import CLIP_PREFIX, SalMM

__all__ = ["RELEASES", "OfficialCheckpoint", "Release", "load_official", "read_official",
           "release_url", "save_official"]

log = logging.getLogger(__name__)


class Release(NamedTuple):
    """One released checkpoint: its file name under the release, and its sha256 (None where
    salmm could not yet read it from the release: then ``salmm official fetch`` records the
    hash it got, checks every key, and says the file is unpinned)."""

    file: str
    sha256: str | None


RELEASE_BASE = "https://github.com/zhao-chunyu/SaliencyMamba/releases/download/supp"
"""Where the authors' ``supp`` release keeps its files (deployment.md); ``SALMM_RELEASES_URL``
replaces it (a mirror, or a local server in tests)."""
RELEASES = {
    "trafficgaze": Release("model_best_salmm_TrafficGaze_256x256_incomplete.tar", None),
    "drfixd-rainy": Release("model_best_salmm_DrFixD_rainy_256x256_incomplete.tar", None),
    "bdda": Release("model_best_salmm_BDDA_256x256_incomplete.tar", None),
}
"""The authors' released checkpoints by dataset (the files deployment.md links)."""


def release_url(name: str) -> str:
    """The download URL of release ``name`` (a key of :data:`RELEASES`)."""


    base = os.environ.get("SALMM_RELEASES_URL") or RELEASE_BASE
    return f"{base.rstrip('/')}/{RELEASES[name].file}"


class OfficialCheckpoint(NamedTuple):
    """epoch (int or None), valid_loss (float or None), the trainable weights, and how many
    CLIP keys were ignored."""

    epoch: int | None
    valid_loss: float | None
    state_dict: dict[str, torch.Tensor]
    ignored_clip_keys: int


def _number(value: Any, kind):
    if value is None:
        return None
    return kind(value.item() if isinstance(value, torch.Tensor) else value)


def read_official(path: str | Path, map_location: str | torch.device = "cpu") -> OfficialCheckpoint:
    """Load (``weights_only=True``) and check a checkpoint against SalMM's published layout.

    Raises BadInputError ("<path>: <problem>") when the file is missing, unreadable, has no
    state_dict, or its weights do not match the layout key for key and shape for shape.
    """
    try:
        checkpoint = load_checkpoint(path, map_location=map_location)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - the unpickler fails in many ways on garbage
        first = (str(err).strip().splitlines() or [""])[0]
        raise BadInputError(
            path, f"not a readable checkpoint ({type(err).__name__}: {first})"
        ) from None
    state = checkpoint["state_dict"]
    if not isinstance(state, dict):
        raise BadInputError(path, f"state_dict is a {type(state).__name__}, not a dict")
    weights = {k: v for k, v in state.items() if not k.startswith(CLIP_PREFIX)}
    check_state_dict(path, weights, SalMM(backend="builtin").state_dict())
    return OfficialCheckpoint(
        epoch=_number(checkpoint.get("epoch"), int),
        valid_loss=_number(checkpoint.get("valid_loss"), float),
        state_dict=weights,
        ignored_clip_keys=len(state) - len(weights),
    )


def load_official(path: str | Path, model: SalMM | None = None, backend: str = "auto") -> SalMM:
    """The authors' (or our own) checkpoint loaded into ``model`` (default: a new
    ``SalMM(backend=backend)``), every key checked; see :func:`read_official`."""
    official = read_official(path)
    model = model if model is not None else SalMM(backend=backend)
    model.load_state_dict(official.state_dict, strict=True)
    log.info(
        "%s: loaded %d tensors (epoch %s, valid_loss %s)",
        path,
        len(official.state_dict),
        official.epoch,
        official.valid_loss,
    )
    return model


def save_official(
    path: str | Path,
    model: SalMM,
    epoch: int,
    valid_loss: float,
    optim_dict: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` in the published checkpoint format (CLIP excluded), atomically."""
    checkpoint = {
        "epoch": int(epoch),
        "state_dict": model.state_dict(),
        "optim_dict": optim_dict if optim_dict is not None else {},
        "valid_loss": float(valid_loss),
    }
    save_checkpoint(path, checkpoint)
