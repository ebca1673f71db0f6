"""Training speed with cached CLIP embeddings against inline CLIP, and what bounds training.

Run: ``python -m bench.train_step [--batch-size 8] [--size 256] [--repeats 5] [--workers 2]
[--threads N] [--work DIR]``

1. Makes a small synthetic prepared dataset with the real commands (``python -m pipeline
   synth``, ``normalize --size SxS``, ``embed --clip-pretrained none``) in a temporary folder
   (or ``--work DIR``, reused when it already holds one).
2. Step time: one training step (forward, BCE, backward, Adam) of the same SalMM weights on the
   same batch, with the cached embedding (``--cached-clip``) and with the frozen CLIP run inline
   (random ViT-B-32 weights cost the same as the OpenAI ones). The two run in turn, so they share
   the machine's load; min and median of the repeats, and their ratio (goal >= 10x). Also the
   cached step's convolution time (torch profiler), the floor under it on this CPU, and the
   ratio that floor allows.
3. Throughput: the data pipeline alone (shards -> decoded, flipped batches with embeddings,
   ``--workers`` processes) against the full cached training loop on the same loader, in
   samples/s; their ratio says which one bounds training.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from bench.timing import time_side_by_side
from pipeline.formats.manifest import read_manifest
from pipeline.formats.prepared import PreparedDataset
from pipeline.formats.shards import split_shards
from salmm.data.stages import SaliencyShards, make_loader
from salmm.training import inputs as train_inputs
from salmm.training import loop as train_loop
from salmm.training import runtime as train_runtime
from salmm.training import trainer as train_trainer
from salmm.training.config import TrainConfig

log = logging.getLogger("bench.train_step")


def run_module(*args: str) -> None:
    """``python -m <args>`` with this interpreter, from the repository; raises on failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")


def prepare(work: Path, size: int, frames: int) -> Path:
    """Synthetic BDDA -> prepared SxS shards -> CLIP cache of the train split (random weights)."""
    prepared = work / "prepared"
    if (prepared / "manifest.json").exists():
        log.info("reusing %s", prepared)
        return prepared
    log.info("preparing a synthetic dataset in %s (synth, normalize, embed)", work)
    run_module("pipeline", "-q", "synth", "--dataset", "bdda", "--out", str(work / "raw"),
               "--videos", "3", "--frames", str(frames))
    run_module("pipeline", "-q", "normalize", "--dataset", "bdda", "--root", str(work / "raw"),
               "--out", str(prepared), "--size", f"{size}x{size}", "--shard-size", "8")
    run_module("pipeline", "-q", "embed", "--prepared", str(prepared), "--clip-pretrained",
               "none", "--split", "train", "--batch-size", "16")
    return prepared


def convolution_seconds(step, repeats: int = 3) -> float:
    """Least CPU time per ``step`` spent in convolution kernels (forward and backward), from
    the torch profiler's self times: a floor under the step that no other optimisation moves."""
    step()
    seconds = []
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        seconds.append(sum(e.self_cpu_time_total for e in prof.key_averages()
                           if "convolution" in e.key) / 1e6)
    return min(seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="square frame size (default 256)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.add_argument("--frames", type=int, default=32, help="synthetic frames per video")
    parser.add_argument("--work", type=Path, help="folder for the dataset (default: temporary)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("salmm").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = str(prepare(opts.work or Path(tmp), opts.size, opts.frames))
        manifest = read_manifest(prepared)
        cfg = TrainConfig(prepared=prepared, cached_clip=True, clip_pretrained=None,
                          size=(opts.size, opts.size), batch_size=opts.batch_size)
        cache, _ = train_inputs.open_checked_cache(cfg, PreparedDataset.open(prepared),
                                                   splits=("train",))
        data = SaliencyShards(split_shards(prepared, manifest, "train"), split="train",
                              train=True, seed=cfg.seed, batch_size=opts.batch_size,
                              size=cfg.size, shuffle_buffer=64, cache_path=cache)
        log.info("torch %s, %d threads, batch %d, %dx%d, %d training samples",
                 torch.__version__, torch.get_num_threads(), opts.batch_size, opts.size,
                 opts.size, manifest["splits"]["train"]["samples"])

        # ---- step time: cached vs inline CLIP, same weights, same batch ----
        torch.manual_seed(0)
        cpu = torch.device("cpu")
        cached = train_trainer.build_model(cfg, cpu)
        inline = train_trainer.build_model(dataclasses.replace(cfg, cached_clip=False), cpu)
        inline.load_state_dict(cached.state_dict())
        batch = next(iter(data))
        frames, labels, emb = batch["frame"].float() / 255, batch["label"], batch["emb"]

        def stepper(model, with_emb):
            optimizer = train_trainer.build_optimizer(cfg, model)

            def step():
                loss = train_loop.bce_loss(model(frames, emb if with_emb else None), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step

        clip = inline.CrossModelAtt.model
        times = time_side_by_side({"cached CLIP (--cached-clip)": stepper(cached, True),
                                   "inline CLIP": stepper(inline, False),
                                   "  of which CLIP encode alone": lambda: clip.encode(frames)},
                                  opts.repeats)
        log.info("training step, forward + backward + Adam (min / median of %d):", opts.repeats)
        for name, (best, median) in times.items():
            log.info("  %-30s %8.3f / %8.3f s", name, best, median)
        (c_min, c_med), (i_min, i_med), (e_min, _) = times.values()
        log.info("  inline / cached: %.1fx (min), %.1fx (median)  [goal >= 10x]",
                 i_min / c_min, i_med / c_med)
        log.info("  CLIP is %.0f%% of the inline step; the rest, all of the cached step, is SalMM's"
                 " own forward + backward", 100 * e_min / i_min)
        log.info("  10x needs a cached step <= CLIP encode / 9 = %.3f s (now %.3f s, min)",
                 e_min / 9, c_min)
        conv = convolution_seconds(stepper(cached, True))
        log.info("  the cached step's convolutions alone (forward + backward, torch profiler):"
                 " %.3f s -> with every other op free, inline / cached <= %.1fx", conv,
                 (conv + e_min) / conv)

        # ---- throughput: data pipeline alone vs the full cached loop ----
        loader = make_loader(data, opts.workers, pin_memory=False, seed=cfg.seed)
        rt = train_runtime.Runtime(rank=0, world_size=1, device=cpu, autocast=None)
        optimizer = train_trainer.build_optimizer(cfg, cached)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        data_rates, loop_rates = [], []
        epochs = max(2, opts.repeats // 2)
        for epoch in range(1, 1 + epochs):
            data.set_epoch(epoch)
            start = time.perf_counter()
            n = sum(len(b["key"]) for b in loader)
            data_rates.append(n / (time.perf_counter() - start))
            result = train_loop.train_epoch(cached, loader, None, optimizer, scaler, rt, 0, epoch - 1,
                                       epochs, n, None)
            loop_rates.append(result.samples / result.seconds)
        data_rate, loop_rate = statistics.median(data_rates), statistics.median(loop_rates)
        log.info("throughput, %d data workers (median of %d epochs):", opts.workers,
                 len(data_rates))
        log.info("  %-30s %8.1f samples/s", "data pipeline alone", data_rate)
        log.info("  %-30s %8.1f samples/s", "full training loop (cached)", loop_rate)
        log.info("  data / loop: %.1fx -> training is bound by %s", data_rate / loop_rate,
                 "the model step" if data_rate > loop_rate else "the data pipeline")


if __name__ == "__main__":
    main()
