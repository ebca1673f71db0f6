"""Training and validation data: prepared WebDataset shards (and cached CLIP embeddings) as
small composable stages.

Training reads, by default, a **true permutation per epoch** (``--order permutation``), as the
authors' ``DataLoader(shuffle=True)`` does: :class:`EpochBatches` draws a permutation of the
split from (seed, epoch) with numpy's PCG64, gives rank ``r`` of ``W`` the rows ``perm[r::W]``
(cut to equal lengths) and cuts them into batches (the last one short); the data workers fetch
each row by random access through the split's index of member offsets
(:class:`~pipeline.formats.shard_index.SampleReader`, every span checked against its sha256), decode,
flip and join the embedding (:class:`IndexedSamples`). The batches are the same whatever the
number of workers, and a resumed run draws the same ones. The split's embeddings are read into
memory once, before the workers start (forked workers share the pages: BDDA's train split is
1.2 GB in float32, TrafficGaze's 0.2 GB).

The streaming order (``--order stream``, for remote stores where random access is slow) reads
shards in an order drawn from (seed, epoch) through a shuffle buffer, per process (rank) and
data worker::

    shuffled_shards        the split's shards in an order drawn from (seed, epoch), same on all ranks
    wds.split_by_node      shards[rank::world_size]
    wds.split_by_worker    shards[worker::num_workers]
    read_shards            tar -> {"__key__", "__url__", "png", "fixations.npy", ...}
    wds.shuffle            sample buffer, rng drawn from (seed, epoch, rank, worker)
    decode                 "frame" uint8 [3, H, W] RGB, "label" float32 [1, H, W] (pipeline.formats.shards.decode_label)
    random_hflip           flips frame and label together; decision drawn from (seed, epoch, key)
    join_embeddings        "emb" float32 [D]: the cached embedding of the frame as fed to the model
                           (index 1, of the flipped frame, exactly when the frame was flipped)
    wds.batched            batches of dicts of stacked tensors (see :func:`collate`)

Validation keeps shard order, does not shuffle or flip. Every random decision is a function of
(seed, epoch, ...) only, so an epoch's batches are the same however often the run restarts.
Frames stay uint8 until they reach the training device (4x less to copy); the model gets
``frame.float() / 255``, exactly the authors' ``img.astype('float32') / 255.0`` and what
``python -m pipeline embed`` fed CLIP.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds

from pipeline.core.errors import BadInputError
from pipeline.formats.clip_cache import open_cache
from pipeline.formats.shard_index import SampleReader
from pipeline.formats.shards import Shard, decode_frame, decode_label, read_shard

FLIP_PROBABILITY = 0.5
ORDERS = ("permutation", "stream")
"""How training reads a split: a permutation per epoch by random access (default), or shards
streamed through a shuffle buffer."""
CACHED_CHUNKS = 16
"""Cache chunks an :class:`EmbeddingTable` keeps: a shuffle buffer of 1000 samples spans a
couple of shards, ~4 chunks each at the default 256-sample chunks."""


# ---- seeded decisions --------------------------------------------------------------------------


def _uniform(*parts: Any) -> float:
    """A number in [0, 1) that depends only on ``parts`` (sha256 of their text)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def derived_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (e.g. seed, epoch, rank, worker)."""
    return random.Random(int(_uniform(*parts) * 2**53))


def flip_decision(seed: int, epoch: int, key: str, p: float = FLIP_PROBABILITY) -> bool:
    """Whether sample ``key`` is flipped in ``epoch``: true with probability ``p``, the same on
    every rank, worker and restart."""
    return _uniform("flip", seed, epoch, key) < p


# ---- stages ------------------------------------------------------------------------------------


def shuffled_shards(shards: Sequence[Shard], seed: int, epoch: int) -> list[Shard]:
    """``shards`` in an order drawn from (seed, epoch); identical on all ranks, so splitting the
    list by rank partitions it."""
    order = list(shards)
    derived_rng("shards", seed, epoch).shuffle(order)
    return order


def read_shards(shards: Iterable[Shard]) -> Iterator[dict[str, Any]]:
    """Samples of each shard in tar order: ``{"__key__", "__url__", ext: bytes, ...}``, each
    shard checked against its manifest sha256 and sample count as it is read
    (:func:`pipeline.formats.shards.read_shard`; BadInputError naming the shard)."""
    for shard in shards:
        yield from read_shard(shard)


def decode(samples: Iterable[dict[str, Any]], size: tuple[int, int]) -> Iterator[dict[str, Any]]:
    """Raw sample -> ``{"key", "frame": uint8 [3, H, W], "label": float32 [1, H, W] in [0, 1]}``.

    BadInputError (naming the shard and the sample) for a missing or undecodable field or a
    frame/label whose size is not ``size`` (height, width).
    """
    for sample in samples:
        yield decode_sample(sample, size)


def decode_sample(sample: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """One raw sample decoded (see :func:`decode`)."""
    rgb = decode_frame(sample, size)                                 # uint8 [H, W, 3]
    label = decode_label(sample, size)                               # float32 [H, W]
    return {
        "key": sample["__key__"],
        "index": sample["__index__"],
        "frame": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
        "label": torch.from_numpy(label)[None],
        "flipped": False,
    }


def random_hflip(samples: Iterable[dict[str, Any]], seed: int, epoch: int,
                 p: float = FLIP_PROBABILITY) -> Iterator[dict[str, Any]]:
    """Flip frame and label left-right together, with probability ``p`` per sample, decided by
    :func:`flip_decision`; sets ``"flipped"``."""
    for sample in samples:
        yield flip_sample(sample, seed, epoch, p)


def flip_sample(sample: dict[str, Any], seed: int, epoch: int,
                p: float = FLIP_PROBABILITY) -> dict[str, Any]:
    """One sample of :func:`random_hflip`."""
    if flip_decision(seed, epoch, sample["key"], p):
        return {**sample, "frame": sample["frame"].flip(-1), "label": sample["label"].flip(-1),
                "flipped": True}
    return sample


class EmbeddingTable:
    """The cached CLIP embeddings of one split, looked up by the sample's place in the split.

    The cache's rows are in shard order, so a shard's samples are one contiguous run of rows and
    a worker reading a shard needs only the few cache chunks that run covers: the table reads a
    chunk (its keys and embeddings) the first time one of its rows is asked for and keeps the
    ``chunks`` most recently used (each C x 2 x D float32: 1 MiB at C = 256, D = 512). Memory
    stays flat in the split's size. The cache is opened on first use, in the process that asks
    (each data worker opens its own; pickling leaves the open cache behind).
    """

    def __init__(self, cache_path: str, split: str, chunks: int = CACHED_CHUNKS) -> None:
        self.cache_path = cache_path
        self.split = split
        self.chunks = chunks
        self.reads = 0                                  # chunks read so far (for tests, logs)
        self._cache: Any = None
        self._lru: OrderedDict[int, tuple[list[str], np.ndarray]] = OrderedDict()
        self._all: tuple[list[str], np.ndarray] | None = None

    def preload(self) -> None:
        """Read the whole split into memory now (random access then reads no chunk; forked
        workers share the pages)."""
        self._all = open_cache(self.cache_path).load_split(self.split)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None, "_lru": OrderedDict(), "reads": 0}

    def _rows(self, row: int) -> tuple[list[str], np.ndarray, int]:
        """(keys, embeddings, place of ``row`` in them) of the block holding ``row``."""
        if self._all is not None:
            return (*self._all, row)
        size = self._cache.identity["chunk_size"]
        keys, emb = self._chunk(row // size)
        return keys, emb, row % size

    def _chunk(self, index: int) -> tuple[list[str], np.ndarray]:
        if index in self._lru:
            self._lru.move_to_end(index)
            return self._lru[index]
        if self._cache is None:
            self._cache = open_cache(self.cache_path)
        found = self._cache.read_chunk(self.split, index)
        self.reads += 1
        self._lru[index] = found
        while len(self._lru) > self.chunks:
            self._lru.popitem(last=False)
        return found

    def lookup(self, row: int, key: str, flipped: bool) -> np.ndarray:
        """float32 [D]: the embedding of sample ``row`` of the split (the frame, or its mirror
        image when ``flipped``); BadInputError unless the cache holds ``key`` at that row."""
        if self._all is None and self._cache is None:
            self._cache = open_cache(self.cache_path)
        rows = len(self._all[0]) if self._all is not None \
            else self._cache.identity["splits"].get(self.split, 0)
        if not 0 <= row < rows:
            raise BadInputError(self.cache_path, f"no embedding for sample {key} of split"
                                f" {self.split}; re-run `python -m pipeline embed`")
        keys, emb, at = self._rows(row)
        if keys[at] != key:
            raise BadInputError(self.cache_path, f"row {row} of split {self.split} holds sample"
                                f" {keys[at]}, the shards have {key} there; re-run"
                                " `python -m pipeline embed`")
        return emb[at, int(flipped)]


def join_embeddings(samples: Iterable[dict[str, Any]], table: EmbeddingTable
                    ) -> Iterator[dict[str, Any]]:
    """Add ``"emb"`` float32 [D]: the cached embedding matching the sample's flip state."""
    for sample in samples:
        yield join_embedding(sample, table)


def join_embedding(sample: dict[str, Any], table: EmbeddingTable) -> dict[str, Any]:
    """One sample of :func:`join_embeddings`."""
    emb = table.lookup(sample["index"], sample["key"], sample["flipped"])
    return {**sample, "emb": torch.from_numpy(np.array(emb))}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """List of samples -> batch: ``key`` list[str] [B], ``index`` list[int] [B] (places in the
    split), ``frame`` uint8 [B, 3, H, W], ``label`` float32 [B, 1, H, W], ``flipped`` bool [B],
    and ``emb`` float32 [B, D] when present."""
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "index": [s["index"] for s in samples],
        "frame": torch.stack([s["frame"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
    }
    if "emb" in samples[0]:
        batch["emb"] = torch.stack([s["emb"] for s in samples])
    return batch


# ---- the dataset -------------------------------------------------------------------------------


class SaliencyShards(torch.utils.data.IterableDataset):
    """Batches of one split, for one epoch at a time (set with :meth:`set_epoch`).

    ``train``: shuffle shards and samples and flip at random (seeded); otherwise read in order.
    ``cache_path``: join cached CLIP embeddings (split ``split`` of that cache); None leaves
    them out (inline CLIP). The epoch lives in shared memory so persistent DataLoader workers
    see :meth:`set_epoch` calls made in the training process.
    """

    def __init__(self, shards: Sequence[Shard], *, split: str, train: bool, seed: int,
                 batch_size: int, size: tuple[int, int], shuffle_buffer: int = 1000,
                 cache_path: str | None = None) -> None:
        super().__init__()
        if not shards:
            raise ValueError(f"split {split!r} has no shards")
        self.shards = list(shards)
        self.split = split
        self.train = train
        self.seed = seed
        self.batch_size = batch_size
        self.size = tuple(size)
        self.shuffle_buffer = shuffle_buffer
        self.table = EmbeddingTable(cache_path, split) if cache_path is not None else None
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration (in this process and in persistent workers) epoch ``epoch``."""
        self._epoch.value = epoch

    def _shard_order(self, epoch: int) -> list[Shard]:
        return shuffled_shards(self.shards, self.seed, epoch) if self.train else list(self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        shards = wds.split_by_worker(wds.split_by_node(iter(self._shard_order(epoch))))
        samples: Iterator[dict[str, Any]] = read_shards(shards)
        if self.train:
            rng = derived_rng("samples", self.seed, epoch, rank, worker)
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        samples = decode(samples, self.size)
        if self.train:
            samples = random_hflip(samples, self.seed, epoch)
        if self.table is not None:
            samples = join_embeddings(samples, self.table)
        yield from wds.batched(self.batch_size, collation_fn=collate, partial=True)(samples)

    def batches_in_epoch(self, epoch: int, num_workers: int, rank: int = 0,
                         world_size: int = 1) -> int:
        """How many batches rank ``rank`` gets in ``epoch`` with ``num_workers`` data workers
        (each worker batches its own shards, so each may end with a short batch)."""
        mine = self._shard_order(epoch)[rank::world_size]
        return sum(math.ceil(sum(s.samples for s in mine[w::max(1, num_workers)]) / self.batch_size)
                   for w in range(max(1, num_workers)))

    def samples_in_epoch(self, rank: int = 0, world_size: int = 1, epoch: int = 0) -> int:
        """Samples rank ``rank`` reads in ``epoch``."""
        return sum(s.samples for s in self._shard_order(epoch)[rank::world_size])


# ---- a permutation per epoch -------------------------------------------------------------------


def epoch_permutation(samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(samples)`` drawn from (seed, epoch) only (numpy's PCG64)."""
    return np.random.default_rng([seed, epoch]).permutation(samples)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (epoch, row) pairs for one rank: a fresh permutation of the split each epoch
    (:func:`epoch_permutation`), ``perm[rank::world_size]`` cut to ``samples // world_size``
    rows so every rank takes the same number of steps, in batches of ``batch_size`` (the last
    one short). Set the epoch with :meth:`set_epoch` (it lives in the training process)."""

    def __init__(self, samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if samples < world_size:
            raise ValueError(f"{samples} samples cannot be shared by {world_size} processes")
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def per_rank(self) -> int:
        return self.samples // self.world_size

    def rows(self, epoch: int) -> np.ndarray:
        """The rows this rank reads in ``epoch``, in order."""
        perm = epoch_permutation(self.samples, self.seed, epoch)
        return perm[self.rank::self.world_size][:self.per_rank]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, rows = self.epoch, self.rows(self.epoch).tolist()
        for start in range(0, len(rows), self.batch_size):
            yield [(epoch, row) for row in rows[start:start + self.batch_size]]

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)


class IndexedSamples(torch.utils.data.Dataset):
    """Training samples by random access: item ``(epoch, row)`` is row ``row`` of the split read
    through its index, decoded, flipped as :func:`flip_decision` says for (seed, epoch, key),
    with its cached embedding when ``table`` is given (preload it before the workers start)."""

    def __init__(self, reader: SampleReader, *, seed: int, size: tuple[int, int],
                 table: EmbeddingTable | None = None) -> None:
        self.reader, self.seed, self.size, self.table = reader, seed, tuple(size), table

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, row = item
        sample = flip_sample(decode_sample(self.reader.read(row), self.size), self.seed, epoch)
        return join_embedding(sample, self.table) if self.table is not None else sample


def make_indexed_loader(samples: IndexedSamples, batches: EpochBatches, workers: int,
                        pin_memory: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader over ``batches`` of ``samples``: ``workers`` persistent processes (0: in the
    training process); batches come in sampler order whatever the number of workers."""
    return torch.utils.data.DataLoader(
        samples, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
        collate_fn=collate, persistent_workers=workers > 0, in_order=True,
        generator=torch.Generator().manual_seed(seed))


def make_loader(dataset: SaliencyShards, workers: int, pin_memory: bool, seed: int = 0
                ) -> torch.utils.data.DataLoader:
    """DataLoader over the dataset's batches: ``workers`` persistent processes (0: in the
    training process), batches kept in worker order so runs are reproducible. It has its own
    generator, so starting it draws nothing from torch's global one."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0, in_order=True,
        generator=torch.Generator().manual_seed(seed))
