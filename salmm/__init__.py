"""SalM^2 saliency model and its training/evaluation toolkit.

``from salmm import SalMM, build_model, load_official`` (imported on first use).
"""

from __future__ import annotations

import importlib

__all__ = ["SalMM", "build_model", "load_official"]

_HOMES = {"SalMM": "salmm.model.net", "build_model": "salmm.model.net",
          "load_official": "salmm.model.official"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'salmm' has no attribute {name!r}")
