"""A prepared split read for inference: its samples decoded in shard order, in batches.

The split itself - manifest, shards, cache - is a :class:`~pipeline.formats.prepared.PreparedDataset`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.formats.prepared import PreparedDataset
from pipeline.formats.shards import decode_fixations, decode_meta
from salmm.data.stages import decode, read_shards


def iter_samples(data: PreparedDataset, split: str) -> Iterator[dict[str, Any]]:
    """The split's samples in shard order: ``key``, ``frame`` uint8 [3, H, W], ``label`` float32
    [1, H, W], ``fixations`` int [N, 2] (row, col at source resolution), ``meta`` (the sample's
    json: dataset, video, frame, name, ...)."""
    for raw in read_shards(data.shards(split)):
        fixations, meta = decode_fixations(raw), decode_meta(raw)
        (sample,) = decode([raw], data.size)
        yield {**sample, "fixations": fixations, "meta": meta}


def batched(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of up to ``size`` consecutive items."""
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
