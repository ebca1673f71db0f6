"""``python -m pipeline normalize``: a raw dataset → deterministic WebDataset shards + manifest.

The run, top to bottom:

1. **Plan** (client). Per split whose split file exists, the entries in split-file order, each
   paired with its :class:`~pipeline.datasets.spec.Frame` or the reader's BadInputError. Shard ``k``
   of a split covers entries ``[k * shard_size, (k + 1) * shard_size)``: boundaries depend on the
   split file only, so a bad frame shortens one shard instead of shifting all later ones.
2. **Per-frame work** (Dask workers, in chunks, at most a few shards ahead of the writer so
   memory stays flat): hash the raw files, decode, resize, make the label, encode the sample.
3. **Write** (client, in shard order): each shard is written as a deterministic tar to a
   temporary name, fsync'ed and renamed; then its journal record (shard sha256, the raw files'
   fingerprints, skipped frames) is written atomically under ``.progress/``.
4. **Manifest** (client, last): ``inputs.jsonl`` then ``manifest.json`` (its presence means
   "complete"), ``run.json`` (run facts, not versioned); ``.progress/`` is removed.

Re-running resumes: a shard is kept only if its journal record's sha256 matches the file and
its frames' raw files still hash the same (that re-hash is cheap Dask work); shards with
skipped frames are always redone. Output made with other options or inputs is refused (one
error naming what differs) unless ``overwrite=True``. The result is byte-identical to an
uninterrupted run whatever the number of workers, because every byte is a pure function of the
raw inputs and the options, and the client writes in a fixed order.

Modules: :mod:`~pipeline.normalize.settings` (the options the bytes depend on),
:mod:`~pipeline.normalize.plan` (1), :mod:`~pipeline.normalize.frames` (2),
:mod:`~pipeline.normalize.job` (3, 4: the run), :mod:`~pipeline.normalize.journal` (resume),
:mod:`~pipeline.normalize.command` (the command line).
"""

import importlib

__all__ = ["Options", "normalize", "resolve_ground_truth"]

_HOMES = {"normalize": "pipeline.normalize.job", "Options": "pipeline.normalize.settings",
          "resolve_ground_truth": "pipeline.normalize.job"}


def __getattr__(name: str):
    """``normalize``, ``resolve_ground_truth`` and ``Options``, imported on first use (the command line does not need
    the job's imports to show its options)."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'pipeline.normalize' has no attribute {name!r}")
