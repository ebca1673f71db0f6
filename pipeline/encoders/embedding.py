"""Prepared WebDataset shards -> CLIP embedding cache (Zarr), what ``salmm embed`` runs.

Stages, each small:

1. ``_read_samples``: stream the needed shards in order and yield ``(index, key, frame bytes)``
   for the samples of the chunks still missing from the cache.
2. ``_decoded_batches``: decode each frame (``png`` or ``jpg``) to uint8 RGB [H, W, 3] and
   group samples into
   batches that never straddle a cache chunk.
3. :func:`pipeline.core.pipes.prefetch`: run 1-2 in a background thread behind a bounded queue,
   so reading and decoding overlap the encoder.
4. ``embed_jobs``: per batch, :func:`pipeline.encoders.clip.embed_pairs` (each frame and its mirror
   image through the frozen encoder, in fixed micro-batches aligned to the chunk's start, one
   intra-op thread on CPU) -> float32 [n, 2, D] per chunk.
5. ``embed_prepared``: plans the chunks, writes them with :class:`pipeline.formats.clip_cache.CacheWriter`
   (resumable), in this process or one task per chunk on Dask workers - a local cluster of one
   single-threaded encoder process per core by default, or an existing cluster.

Same numbers whatever the run: a chunk's embeddings depend only on its frames, the weights,
the device type and the software versions - not on ``--batch-size``, the thread count, the
number of workers, or where a killed run was resumed (the header records what they do depend
on, and a resume into a store with another header is refused).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from distributed import as_completed

from pipeline.core.cpu import reuse_freed_memory, usable_cores
from pipeline.core.dask_cluster import dask_client
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.pipes import prefetch as prefetch_in_thread
from pipeline.core.progress import Progress
from pipeline.core.progress import progress as progress_bar
from pipeline.encoders.clip import (
    CACHE_THREADS,
    MICRO_BATCH,
    PUBLISHED,
    ClipSpec,
    cached_encoder,
    embed_pairs,
)
from pipeline.formats.clip_cache import (
    DEFAULT_CHUNK_SIZE,
    CacheWriter,
    default_cache_path,
    recorded_version,
)
from pipeline.formats.images import decode_rgb_bytes
from pipeline.formats.manifest import canonical_json
from pipeline.formats.prepared import PreparedDataset
from pipeline.formats.shards import Shard, frame_field, read_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compute:
    """Where the encoder runs: device ("cpu", "cuda", "cuda:1") and, on CUDA, the autocast
    dtype ("fp32" | "bf16" | "fp16"; CPU always computes in float32). Hashable."""

    device: str = "cpu"
    precision: str = "fp32"

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def header(self) -> dict[str, Any]:
        """What the cache header records of it: everything its numbers depend on."""
        cuda = self.device_type == "cuda"
        return {"device": self.device_type, "autocast": self.precision if cuda else "fp32",
                "micro_batch": MICRO_BATCH.get(self.device_type, MICRO_BATCH["cuda"]),
                "intra_op_threads": None if cuda else CACHE_THREADS}


@dataclass(frozen=True)
class ChunkJob:
    """One cache chunk to compute: samples [start, stop) of ``split``."""

    split: str
    index: int
    start: int
    stop: int


class _Verified:
    """How far the reader has checked the split: every shard ending at or before ``end``
    (a sample index) was read whole and matched its manifest sha256."""

    def __init__(self) -> None:
        self.end = 0


def _read_samples(shards: Sequence[Shard], jobs: Sequence[ChunkJob],
                  verified: _Verified | None = None) -> Iterator[tuple[int, str, str, bytes]]:
    """(index in the split, shard URL, key, frame bytes) for every sample inside ``jobs`` (one
    split, ascending, disjoint), reading only the shards that hold them - each one whole, its
    sha256 and sample count checked against the manifest (:func:`pipeline.formats.shards.read_shard`);
    ``verified.end`` advances as each shard passes."""
    starts = [j.start for j in jobs]
    stops = [j.stop for j in jobs]

    def wanted(index: int) -> bool:
        i = bisect.bisect_right(starts, index) - 1
        return i >= 0 and index < stops[i]

    for shard in shards:
        i = bisect.bisect_right(starts, shard.end - 1) - 1   # last job starting inside the shard
        if i < 0 or stops[i] <= shard.first:                   # no job overlaps the shard
            continue
        for index, sample in enumerate(read_shard(shard), start=shard.first):
            if wanted(index):
                yield index, shard.url, sample["__key__"], sample[frame_field(sample)]
        if verified is not None:
            verified.end = shard.end


@dataclass
class _Batch:
    job: ChunkJob
    keys: list[str]
    frames: torch.Tensor        # uint8 [b, H, W, 3]
    last: bool                  # last batch of ``job``


def _decoded_batches(shards: Sequence[Shard], jobs: Sequence[ChunkJob], batch_size: int,
                     pin: bool = False, size: tuple[int, int] | None = None,
                     verified: _Verified | None = None) -> Iterator[_Batch]:
    """Decoded batches of at most ``batch_size`` samples, each within one job, in job order;
    ``size`` (height, width): every frame must be that (checked from its header)."""
    jobs = sorted(jobs, key=lambda j: j.start)
    job_iter = iter(jobs)
    job = next(job_iter, None)
    keys: list[str] = []
    frames: list[np.ndarray] = []

    def batch(last: bool) -> _Batch:
        tensor = torch.from_numpy(np.stack(frames))
        return _Batch(job, list(keys), tensor.pin_memory() if pin else tensor, last)

    for index, url, key, data in _read_samples(shards, jobs, verified):
        while job is not None and index >= job.stop:
            job = next(job_iter, None)
        frame = decode_rgb_bytes(data, f"{url}#{key}", expect=size)
        if frames and frame.shape != frames[0].shape:
            raise BadInputError(url, f"sample {key}: frame is {frame.shape}, other frames are"
                                f" {frames[0].shape}")
        keys.append(key)
        frames.append(frame)
        if index == job.stop - 1 or len(frames) == batch_size:
            yield batch(last=index == job.stop - 1)
            keys, frames = [], []


def aligned_batch_size(batch_size: int, compute: Compute) -> int:
    """``batch_size`` rounded up to a whole number of the encoder's micro-batches, so every
    batch but a chunk's last starts on a micro-batch boundary counted from the chunk's start."""
    micro = compute.header()["micro_batch"]
    return max(1, math.ceil(batch_size / micro)) * micro


def embed_jobs(encoder: torch.nn.Module, compute: Compute, shards: Sequence[Shard],
               jobs: Sequence[ChunkJob], batch_size: int, prefetch: int = 4,
               progress: Progress | None = None, size: tuple[int, int] | None = None
               ) -> Iterator[tuple[ChunkJob, list[str], np.ndarray]]:
    """(job, keys [n], embeddings float32 [n, 2, D]) for each job, in ascending order; decoding
    runs ``prefetch`` batches ahead in a background thread. ``batch_size`` is rounded up by
    :func:`aligned_batch_size`. A job is handed out only once every shard it reads from was
    read whole and matched its manifest sha256, so no chunk is ever made from a changed shard."""
    pin = compute.device_type == "cuda"
    batch_size = aligned_batch_size(batch_size, compute)
    verified = _Verified()
    keys: list[str] = []
    parts: list[np.ndarray] = []
    done: list[tuple[ChunkJob, list[str], np.ndarray]] = []
    batches = _decoded_batches(shards, jobs, batch_size, pin, size, verified)
    for batch in prefetch_in_thread(batches, prefetch):
        keys += batch.keys
        parts.append(embed_pairs(encoder, batch.frames, compute.precision))
        if progress is not None:
            progress.update(2 * len(batch.keys))
        if batch.last:
            done.append((batch.job, keys, np.concatenate(parts)))
            keys, parts = [], []
        while done and done[0][0].stop <= verified.end:
            yield done.pop(0)
    yield from done                       # the reader finished: every shard passed


def embed_chunk_task(spec: ClipSpec, compute: Compute, shards: Sequence[Shard], job: ChunkJob,
                     batch_size: int, size: tuple[int, int] | None = None
                     ) -> tuple[list[str], np.ndarray]:
    """Dask task: one chunk's (keys, embeddings [n, 2, D]) with this worker's cached encoder."""
    reuse_freed_memory()        # Dask's workers hand freed memory back to the kernel at once
    encoder = cached_encoder(spec, compute.device)
    ((_, keys, emb),) = embed_jobs(encoder, compute, shards, [job], batch_size, prefetch=2,
                                   size=size)
    return keys, emb


def encoder_identity_task(spec: ClipSpec, compute: Compute) -> dict[str, Any]:
    """Dask task: the identity of this worker's cached encoder (also warms the cache)."""
    return dict(cached_encoder(spec, compute.device).identity)


def default_workers(compute: Compute) -> int:
    """Encoder processes by default: one single-threaded encoder per usable core on CPU, one
    process for a GPU."""
    return usable_cores() if compute.device_type == "cpu" else 1


def embed_prepared(prepared: str | Path, out: str | Path | None = None, *,
                   spec: ClipSpec = PUBLISHED, compute: Compute = Compute(),
                   batch_size: int = 32, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   dtype: str = "float32", splits: Sequence[str] | None = None,
                   prefetch: int = 4, workers: int | None = None,
                   dask_address: str | None = None, overwrite: bool = False) -> str:
    """Embed every sample of the prepared dataset at ``prepared`` into a CLIP cache and return
    the cache path (``out``, or :func:`pipeline.formats.clip_cache.default_cache_path`). Resumes an
    unfinished cache; returns at once if it is already complete.

    ``batch_size`` samples are decoded and embedded at a time (rounded up to the encoder's
    micro-batch, see :func:`aligned_batch_size`; it changes no number). ``workers`` encoder
    processes (default :func:`default_workers`; 1 runs in this process) on a local Dask
    cluster, or with ``dask_address`` one task per missing chunk on that cluster (its workers
    must reach the prepared shards; ``compute.device`` is the workers' device). A store made
    with other settings is refused unless ``overwrite``; at the default path, one made from
    another version of this prepared dataset is stale and replaced (logged). The store is
    locked while it is written (a second writer is refused in one line).
    """
    prepared = str(prepared)
    data = PreparedDataset.open(prepared)
    splits = list(splits) if splits else list(data.splits)
    unknown = [s for s in splits if s not in data.splits]
    if unknown:
        raise BadInputError(prepared, f"the prepared dataset has no split(s) {unknown}"
                            f" (has {sorted(data.splits)})")
    if workers is not None and dask_address:
        raise ValueError("give either a Dask scheduler address or a worker count, not both")
    shards = {s: data.shards(s) for s in splits}
    samples = sum(sh.samples for s in splits for sh in shards[s])
    local = max(1, min(workers or default_workers(compute), math.ceil(samples / chunk_size)))
    with contextlib.ExitStack() as stack:
        client = encoder = None
        if dask_address or local > 1:
            client = stack.enter_context(dask_client(address=dask_address,
                                                     workers=None if dask_address else local))
            identity = client.submit(encoder_identity_task, spec, compute, pure=False).result()
        else:
            encoder = cached_encoder(spec, compute.device)
            identity = dict(encoder.identity)
        header = _header(compute, identity, dtype, data, shards, chunk_size)
        default = default_cache_path(prepared, identity, dtype)
        out = str(out) if out is not None else default
        writer = _open_store(stack, out, header, overwrite=overwrite, default=out == default)
        jobs = {s: [ChunkJob(s, i, *writer.chunk_range(s, i)) for i in writer.missing_chunks(s)]
                for s in splits}
        todo = sum(j.stop - j.start for js in jobs.values() for j in js)
        log.info("embedding %d samples (%d images with flips) into %s on %s", todo, 2 * todo,
                 out, f"{len(client.scheduler_info()['workers'])} Dask worker(s)" if client
                 else "this process")
        started = time.perf_counter()
        with progress_bar(total=2 * todo, unit="img", desc="embed", smoothing=0.1) as progress:
            if client is None:
                for split in splits:
                    for job, keys, emb in embed_jobs(encoder, compute, shards[split],
                                                     jobs[split], batch_size, prefetch,
                                                     progress, data.size):
                        writer.write_chunk(split, job.index, keys, emb)
            else:
                _embed_on_dask(client, writer, spec, compute, shards, jobs, batch_size,
                               progress, data.size)
        writer.finish()
    elapsed = time.perf_counter() - started
    log.info("CLIP cache complete: %s (%s samples; %d images embedded now in %.1f s, %.1f images/s;"
             " weights %s)", out, header["splits"], 2 * todo, elapsed,
             2 * todo / elapsed if elapsed > 0 else 0.0, identity["weights"])
    return out


def _open_store(stack: contextlib.ExitStack, out: str, header: dict[str, Any], *,
                overwrite: bool, default: bool) -> CacheWriter:
    """The writer of the store at ``out``, locked for the rest of ``stack``. A store made with
    other settings is replaced with ``overwrite``; the prepared folder's ``default`` store is
    replaced too when it was made from another version of the data (it is stale); any other
    is refused."""
    parent, _, name = out.rstrip("/").rpartition("/")
    stack.enter_context(Folder(parent or ".").lock(f"{name}.lock", subject=out))
    stale = recorded_version(out) not in (None, header["prepared"]["version_id"])
    return CacheWriter.open(out, header, replace=overwrite or (default and stale))


def _header(compute: Compute, identity: dict[str, Any], dtype: str, data: PreparedDataset,
            shards: dict[str, list[Shard]], chunk_size: int) -> dict[str, Any]:
    """The cache header: everything the stored numbers depend on (see
    :mod:`pipeline.formats.clip_cache`)."""
    return {
        "encoder": identity,
        "dtype": dtype,
        "compute": compute.header(),
        "prepared": {"version_id": data.version,
                     "manifest_sha256": hashlib.sha256(canonical_json(data.manifest)).hexdigest()},
        "software": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "splits": {s: sum(sh.samples for sh in shards[s]) for s in shards},
        "chunk_size": chunk_size,
    }


def _embed_on_dask(client: Any, writer: CacheWriter, spec: ClipSpec, compute: Compute,
                   shards: dict[str, list[Shard]], jobs: dict[str, list[ChunkJob]],
                   batch_size: int, progress: Progress, size: tuple[int, int]) -> None:
    """Run one task per chunk on the cluster (at most 2 per worker in flight) and write each
    chunk as it arrives."""
    pending = [j for js in jobs.values() for j in js]
    limit = 2 * max(1, len(client.scheduler_info().get("workers", {})))

    job_of: dict[str, ChunkJob] = {}

    def submit(job: ChunkJob) -> Any:
        needed = [s for s in shards[job.split] if s.first < job.stop and job.start < s.end]
        future = client.submit(embed_chunk_task, spec, compute, needed, job, batch_size, size,
                               pure=False)
        job_of[future.key] = job
        return future

    running = as_completed([submit(pending.pop(0)) for _ in range(min(limit, len(pending)))])
    for future in running:
        keys, emb = future.result()
        job = job_of.pop(future.key)
        writer.write_chunk(job.split, job.index, keys, emb)
        progress.update(2 * len(keys))
        if pending:
            running.add(submit(pending.pop(0)))
