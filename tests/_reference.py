"""Where the authors' SalM² code is, for the differential tests that compare against it.

``SALMM_REFERENCE_REPO`` names a checkout of their repository (or the subset under
``shared/reference/SaliencyMamba`` beside this project, the default). Their modules are
imported from their files where they lie, never copied: :func:`reference_module`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "reference" / "SaliencyMamba"


def reference_repo() -> Path | None:
    """The authors' repository, or None when it is not at hand."""
    folder = Path(os.environ.get("SALMM_REFERENCE_REPO", DEFAULT))
    return folder if (folder / "utils" / "datasets" / "TrafficGaze.py").is_file() else None


def skip_reason() -> str:
    where = os.environ.get("SALMM_REFERENCE_REPO", DEFAULT)
    return f"the authors' SaliencyMamba code is not at {where} (set SALMM_REFERENCE_REPO)"


needs_reference = pytest.mark.skipif(reference_repo() is None, reason=skip_reason())


def reference_module(relative: str) -> ModuleType:
    """Import one file of the authors' repository by its path (``utils/datasets/BDDA.py``),
    under a private name, without putting their folders on ``sys.path``."""
    path = reference_repo() / relative
    name = "authors_" + relative.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_metrics() -> str | None:
    """The folder of the authors' MATLAB metric loops: ``SALMM_OFFICIAL_METRICS``, else
    ``metrics/calcForDataset`` of :func:`reference_repo`; None when neither is there."""
    folder = os.environ.get("SALMM_OFFICIAL_METRICS")
    if folder:
        return folder
    repo = reference_repo()
    found = repo / "metrics" / "calcForDataset" if repo is not None else None
    return str(found) if found is not None and found.is_dir() else None
