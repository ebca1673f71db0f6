"""The authors' released SalM^2 checkpoints, read and written key for key.

``model_best_salmm_<dataset>_256x256_incomplete.tar`` is a ``torch.save`` dict
``{"epoch", "state_dict", "optim_dict", "valid_loss"}`` written by the authors' ``train.py``
(a plain ``model.state_dict()``: no DataParallel ``module.`` prefix) with the frozen CLIP
weights (``CrossModelAtt.model.*``) stripped. :func:`load_official` accepts exactly the
published trainable layout; CLIP keys are ignored when present (a "complete" checkpoint) and
never required. Anything else - a missing, extra or mis-shaped key - is refused with one line
naming the file and every offender.

CLI: ``python -m salmm.official CKPT [--check]`` prints epoch and valid_loss and confirms
every key; ``--check`` also runs one forward pass on a random 256x256 frame.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.core.errors import BadInputError
from salmm.model.checkpoint import check_state_dict, load_checkpoint, save_checkpoint
from salmm.model.net import CLIP_PREFIX, SalMM

__all__ = ["OfficialCheckpoint", "load_official", "read_official", "save_official"]

log = logging.getLogger(__name__)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m salmm.official", description="Check an official SalM^2 checkpoint."
    )
    parser.add_argument(
        "checkpoint", help="e.g. model_best_salmm_TrafficGaze_256x256_incomplete.tar"
    )
    parser.add_argument(
        "--check", action="store_true", help="also run one forward pass on a random frame"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        official = read_official(args.checkpoint)
        model = SalMM(backend="auto")
        model.load_state_dict(official.state_dict, strict=True)
    except BadInputError as err:
        log.error("%s", err)
        return 1
    n_params = sum(v.numel() for v in official.state_dict.values())
    log.info("%s", args.checkpoint)
    log.info("  epoch       %s", official.epoch)
    loss = official.valid_loss
    log.info("  valid_loss  %s", "n/a" if loss is None else f"{loss:.6g}")
    log.info(
        "  all %d SalMM keys present with the right shapes (%d values); %d CLIP keys ignored",
        len(official.state_dict),
        n_params,
        official.ignored_clip_keys,
    )
    if args.check:
        model.eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            out = model(
                torch.rand(1, 3, 256, 256, generator=gen), torch.randn(1, 512, generator=gen)
            )
        ok = out.shape == (1, 1, 256, 256) and bool(torch.isfinite(out).all())
        log.info(
            "  forward     [1, 1, 256, 256] map in [%.4g, %.4g]: %s",
            out.min(),
            out.max(),
            "ok" if ok else "FAILED",
        )
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
