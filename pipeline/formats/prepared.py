"""A prepared dataset, opened once: :class:`PreparedDataset` owns its manifest and answers for it.

Every reader of prepared data - the trainer, evaluate, predict, the baselines, embed, compare -
opens the folder (or fsspec URL) with :meth:`PreparedDataset.open`, which reads and checks
``manifest.json`` once (:func:`~pipeline.formats.manifest.read_manifest`: one line naming the
file when it is missing, malformed or of an older format), and then asks it for its version id,
frame size, splits, shards, index and CLIP cache instead of indexing the manifest by hand.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats import clip_cache
from pipeline.formats.manifest import MANIFEST, prepared_size, read_manifest, version_id
from pipeline.formats.shard_index import read_index
from pipeline.formats.shards import Shard, split_shards


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset at ``location`` (a folder or fsspec URL) and its checked ``manifest``.

    ``version``: the data version id; ``size``: (height, width) of its frames and labels;
    ``dataset``: the registry name it was prepared from ("unknown" when not recorded);
    ``splits``: its split names in manifest order.
    """

    location: str
    manifest: Mapping[str, Any]

    @classmethod
    def open(cls, location: str | Any) -> PreparedDataset:
        """Read and check ``location``'s manifest (BadInputError, one line, otherwise)."""
        return cls(str(location), read_manifest(str(location)))

    @functools.cached_property
    def version(self) -> str:
        return version_id(self.manifest)

    @functools.cached_property
    def size(self) -> tuple[int, int]:
        return prepared_size(self.manifest)

    @property
    def synthetic(self) -> bool:
        """Whether it was made from ``pipeline synth``'s generated data (not recordings)."""
        return bool(self.manifest.get("synthetic"))

    @property
    def dataset(self) -> str:
        return str(self.manifest.get("dataset", "unknown"))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("splits", {}))

    @property
    def manifest_url(self) -> str:
        """Where ``manifest.json`` is, for messages."""
        return Folder(self.location).url(MANIFEST)

    def samples(self, split: str) -> int:
        """How many samples ``split`` has (0 for a split it does not have)."""
        return int(self.manifest.get("splits", {}).get(split, {}).get("samples", 0))

    def checked_split(self, split: str) -> int:
        """The sample count of ``split``; BadInputError naming the manifest when the split is
        unknown or empty."""
        if split not in self.splits:
            raise BadInputError(self.manifest_url, f"no split {split!r} (has"
                                f" {', '.join(sorted(self.splits))})")
        if self.samples(split) == 0:
            raise BadInputError(self.manifest_url, f"split {split!r} has no samples")
        return self.samples(split)

    def shards(self, split: str) -> list[Shard]:
        """The shards of ``split`` in manifest order."""
        return split_shards(self.location, self.manifest, split)

    def index(self, split: str) -> np.ndarray:
        """The split's random-access index, checked against the manifest."""
        return read_index(self.location, self.manifest, split)

    def clip_cache(self, path: str | None, identity: Mapping[str, Any],
                   splits: Sequence[str]) -> tuple[str, dict[str, Any]]:
        """(path, identity) of the CLIP cache (``path``, or the default one for ``identity``)
        after checking it was made from this version with that encoder and holds ``splits``."""
        return clip_cache.open_checked_cache(path, self.location, self.manifest, identity,
                                             splits)
