"""Numba's on-disk cache for salmm's CPU kernels, keyed on all of their sources.

Numba caches a compiled kernel with a stamp of its own source file only, yet a kernel's machine
code includes every numba function it calls, inlined or linked, from other files: after an
update that changed, say, :mod:`salmm.model.numba_math` or :mod:`salmm.model.mamba_cpu` but
not :mod:`salmm.model.layer_train_cpu` (a ``git pull`` in an editable install), the layer's
cached kernels would still run the old code - against the new callers' data layout. The
locators here stamp every kernel of :data:`KERNEL_MODULES` with one hash of all their source
files, so any change to any of them recompiles them all (once; the first run's cost, see the
README). Cache files stay where numba puts them (``NUMBA_CACHE_DIR`` when set, else
``__pycache__``, else the user's cache folder when the install is read-only).
Imported by :mod:`salmm.model.numba_math`, which every kernel module imports before it defines
a kernel.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from numba.core.caching import (
    CacheImpl,
    InTreeCacheLocator,
    UserProvidedCacheLocator,
    UserWideCacheLocator,
)

__all__ = ["KERNEL_MODULES", "kernel_sources_stamp"]

KERNEL_MODULES = ("numba_math", "scan_cpu", "layer_cpu", "mamba_cpu", "layer_train_cpu",
                  "maps_cpu")
"""The modules of this package that define cached numba kernels (a test holds the list)."""

_HERE = Path(__file__).resolve().parent
_FILES = frozenset(str(_HERE / f"{name}.py") for name in KERNEL_MODULES)
_stamp: bytes | None = None


def kernel_sources_stamp() -> bytes:
    """sha256 over the kernel modules' sources, in :data:`KERNEL_MODULES` order (read once
    per process)."""
    global _stamp
    if _stamp is None:
        digest = hashlib.sha256()
        for name in KERNEL_MODULES:
            digest.update((_HERE / f"{name}.py").read_bytes())
        _stamp = digest.digest()
    return _stamp


class _Sources:
    """Mixin: claim only the kernel modules' functions; stamp them with all their sources."""

    def get_source_stamp(self):
        return kernel_sources_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        if str(Path(py_file).resolve()) not in _FILES:
            return None
        return super().from_function(py_func, py_file)


class _UserProvided(_Sources, UserProvidedCacheLocator):
    """``NUMBA_CACHE_DIR`` when set."""


class _InTree(_Sources, InTreeCacheLocator):
    """``__pycache__`` beside the module."""


class _UserWide(_Sources, UserWideCacheLocator):
    """The user's cache folder, where ``__pycache__`` is not writable (a read-only install)."""


for _locator in (_UserWide, _InTree, _UserProvided):  # before numba's own, in numba's order
    if _locator not in CacheImpl._locator_classes:
        CacheImpl._locator_classes.insert(0, _locator)
