"""Embedding-cache throughput against the bare encoder, measured side by side in one run.

    python -m bench.embed [--samples 48] [--batch-size 16] [--device cpu|cuda] [--precision fp16]

Builds a synthetic prepared dataset (256x256 JPEG frames in WebDataset shards), then times

* bare: :func:`pipeline.encoders.clip.embed_pairs` (the cache's own encoder call: fixed micro-batches
  of frames and their flips, one intra-op thread on CPU) on uint8 frames already in memory,
  as many images as the cache run embeds;
* cache: ``embed_prepared`` end to end in this process (read shards, decode, queue, encode,
  write Zarr chunks) with the same encoder object;
* cache on all cores: ``embed_prepared`` with its default local cluster (one single-threaded
  encoder process per usable core), once, for the speed-up over one process.

It prints the rates in images/s and cache/bare; 1.0 means reading, decoding and writing are
fully hidden behind the encoder. Random weights (``pretrained=None``) cost the same compute as
real ones. Bare and cache runs alternate for ``--rounds`` rounds in ABBA order (each cache run
into a fresh store); the headline is the median of the per-round ratios, so load from other
processes, and its drift, hit both alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.cpu import usable_cores
from pipeline.core.fsio import Folder
from pipeline.encoders.clip import PRECISIONS, ClipSpec, cached_encoder, embed_pairs
from pipeline.encoders.embedding import Compute, embed_prepared
from pipeline.formats.manifest import canonical_json, write_manifest
from pipeline.formats.shards import encode_png, write_shard

log = logging.getLogger("bench.embed")


def synthetic_prepared(root: Path, samples: int, shard_size: int = 32, size: int = 256) -> Path:
    """A prepared dataset of ``samples`` smooth random ``size`` x ``size`` frames (one split)."""
    rng = np.random.default_rng(0)
    folder = Folder(root)
    folder.makedirs()
    entries = []
    for first in range(0, samples, shard_size):
        batch = []
        for i in range(first, min(first + shard_size, samples)):
            coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).astype(np.float32)
            frame = torch.nn.functional.interpolate(
                torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(size, size),
                mode="bilinear")[0].permute(1, 2, 0).numpy()
            noisy = frame + rng.normal(0, 6, frame.shape)
            batch.append({"__key__": f"v{i:05d}_f000001",
                          "png": encode_png(np.clip(noisy, 0, 255).astype(np.uint8)),
                          "json": canonical_json({"i": i})})
        name = f"train-{first // shard_size:06d}.tar"
        entries.append(write_shard(folder, name, batch).manifest_entry())
    write_manifest(folder, {"format": "salmm-prepared", "format_version": 2,
                            "options": {"size": {"height": size, "width": size}},
                            "splits": {"train": {"samples": samples, "shards": entries}}})
    return root


def bare_rate(spec: ClipSpec, compute: Compute, batch_size: int, images: int) -> float:
    """Images/s of the encoder alone on uint8 frames already in memory (the cache's own call:
    to float, flip, encode in fixed micro-batches)."""
    encoder = cached_encoder(spec, compute.device)
    frames = torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8)
    if compute.device_type == "cuda":
        frames = frames.to(compute.device)
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while done < images:
        embed_pairs(encoder, frames, compute.precision)   # 2 * batch_size images, on the host
        done += 2 * batch_size
    return done / (time.perf_counter() - start)


def cache_rate(spec: ClipSpec, compute: Compute, prepared: Path, out: Path,
               args: argparse.Namespace, workers: int | None = 1) -> float:
    """Images/s of ``embed_prepared`` end to end into a new store ``out``."""
    start = time.perf_counter()
    embed_prepared(prepared, out, spec=spec, compute=compute, batch_size=args.batch_size,
                   chunk_size=16, workers=workers)
    return 2 * args.samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=48, help="frames (x2 images with flips)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per encoder call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16",
                        help="autocast dtype on CUDA (ignored on CPU)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/cache rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")          # keep the output to the figures

    cuda = torch.device(args.device).type == "cuda"
    spec = ClipSpec(model=args.model, pretrained=None)
    compute = Compute(args.device, args.precision if cuda else "fp32")
    images = 2 * args.samples
    bares, caches = [], []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = synthetic_prepared(Path(tmp) / "prepared", args.samples)
        bare_rate(spec, compute, args.batch_size, 2 * args.batch_size)   # warm-up
        for r in range(args.rounds):
            store = Path(tmp) / f"c{r}.zarr"
            if r % 2:                                   # ABBA order: drifting load hits both
                caches.append(cache_rate(spec, compute, prepared, store, args))
                bares.append(bare_rate(spec, compute, args.batch_size, images))
            else:
                bares.append(bare_rate(spec, compute, args.batch_size, images))
                caches.append(cache_rate(spec, compute, prepared, store, args))
        everywhere = cache_rate(spec, compute, prepared, Path(tmp) / "all.zarr", args, None)
    bare, cache = statistics.median(bares), statistics.median(caches)
    print(f"device {args.device}, {args.model}, precision {compute.precision}, batch"
          f" {args.batch_size} frames = {2 * args.batch_size} images,"
          f" {images} images per run, {args.rounds} rounds")
    print(f"bare encoder : {bare:8.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in bares)})")
    print(f"cache (e2e)  : {cache:8.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in caches)})")
    print(f"cache, default workers ({usable_cores()} cores): {everywhere:8.1f} images/s"
          f" ({everywhere / cache:.2f}x one process, worker start-up included)")
    ratios = [c / b for c, b in zip(caches, bares, strict=True)]
    print(f"cache / bare : {statistics.median(ratios):8.3f}  (median of per-round ratios:"
          f" {', '.join(f'{x:.3f}' for x in ratios)}; ratio of medians {cache / bare:.3f})")


if __name__ == "__main__":
    main()
