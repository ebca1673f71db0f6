"""Where a model runs: the device a ``--device`` option means and the autocast an ``--amp``
option means on it (the trainer, evaluate, predict and the streaming predictor share both)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def pick_device(name: str | None) -> torch.device:
    """``--device``, default cuda when available else cpu."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``: ``auto`` is bf16 on CUDA devices that
    support it, fp16 on older ones, off on CPU; None means full float32."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
