"""The training data loaders side by side: a permutation per epoch by random access (the
default, as published) against the streaming shuffle buffer.

Run: ``python -m bench.loader [--workers 2] [--batch-size 32] [--frames 300] [--epochs 4]
[--work DIR]``

Makes a synthetic prepared dataset with the real commands (as ``bench.train_step`` does:
synth, normalize at 256x256, embed with random CLIP weights), builds each loader exactly as
``python -m salmm.train`` builds it (:func:`salmm.train.training_loader`), and reads whole
epochs of decoded, flipped batches with their cached embeddings, the two loaders in turn so
they share the machine's load. Prints samples/s of each (median over epochs) and the ratio
permutation / stream (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.train_step import prepare
from pipeline.formats.manifest import read_manifest
from pipeline.formats.prepared import PreparedDataset
from salmm.training import inputs as train_inputs
from salmm.training import loop as train_loop
from salmm.training import runtime as train_runtime
from salmm.training.config import TrainConfig

log = logging.getLogger("bench.loader")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=300, help="synthetic frames per video")
    parser.add_argument("--epochs", type=int, default=4, help="epochs read by each loader")
    parser.add_argument("--work", type=Path, help="folder for the dataset (default: temporary)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("salmm").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = str(prepare(opts.work or Path(tmp), 256, opts.frames))
        manifest = read_manifest(prepared)
        base = TrainConfig(prepared=prepared, cached_clip=True, clip_pretrained=None,
                           batch_size=opts.batch_size, workers=opts.workers)
        data = PreparedDataset.open(prepared)
        cache, identity = train_inputs.open_checked_cache(base, data, splits=("train",))
        inputs = train_inputs.Inputs(data, cache, identity, None)
        rt = train_runtime.Runtime(0, 1, torch.device("cpu"), None)
        loaders = {order: train_inputs.training_loader(dataclasses.replace(base, order=order), rt,
                                                inputs)
                   for order in ("permutation", "stream")}
        rates: dict[str, list[float]] = {order: [] for order in loaders}
        for epoch in range(opts.epochs + 1):            # epoch 0 starts the workers: not timed
            for order, loader in loaders.items():
                train_loop.start_epoch(loader, epoch, base, rt)
                start = time.perf_counter()
                n = sum(len(batch["key"]) for batch in loader)
                if epoch:
                    rates[order].append(n / (time.perf_counter() - start))
        log.info("%d training samples, batch %d, %d data workers, 256x256, cached embeddings",
                 manifest["splits"]["train"]["samples"], opts.batch_size, opts.workers)
        medians = {order: statistics.median(r) for order, r in rates.items()}
        for order, rate in medians.items():
            log.info("  %-12s %8.1f samples/s (median of %d epochs)", order, rate, opts.epochs)
        log.info("loader: permutation / stream = %.2f  [goal >= 0.9]",
                 medians["permutation"] / medians["stream"])


if __name__ == "__main__":
    main()
