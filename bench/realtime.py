"""Real-time driver attention on this machine: SalMM alone against its floor and its eager
path, ``salmm stream`` end to end, onnxruntime against torch, the training step, and what
semantic refresh costs in accuracy.

Run: ``python -m bench.realtime [--frames 96] [--repeats 20] [--checkpoint CKPT] [--work DIR]``

Batch 1, 256x256. The input is a synthetic 1280x720 driving video (``pipeline synth``'s
TrafficGaze frames, MJPG AVI at 30 fps). Measured side by side in one run:

* SalMM alone, one thread: the fused CPU kernels (:mod:`salmm.model.layer_cpu`, what
  inference runs) and the module-by-module eager path (Mamba backend ``builtin``, what
  inference ran before), in turn; the floor = the network's multiply-adds (convolutions and
  matrix products, counted by torch's FLOP counter: 172 MFLOP) / this process's float32
  matmul rate on one thread;
* end to end - ``salmm stream`` on the video (decode, resize, CLIP every K-th frame, SalMM,
  overlay drawn and encoded into an MP4), torch and onnx backends, K in 1, 8, 16, the
  command's own threads (a file: CLIP read ahead in a thread a core, one intra-op thread a
  stage): sustained frames per second and latency p50 / p95;
* SalMM and CLIP alone per backend, one thread and the default (onnx: SalMM on the engine the
  runner chose; onnxruntime's own graph beside it);
* the training step (cached CLIP, batch 8, forward + BCE + backward + Adam): the training path
  against the module path (the same code today: training does not use the fused kernels);
* refresh - CC and KLD (the official metrics) of K > 1 predictions against K = 1.

The last line: ``realtime: salmm_ms=… floor_ms=… ratio_floor=… speedup_vs_eager=… e2e_fps_k8=…
onnx_vs_torch=… train_step_speedup=…`` (onnx_vs_torch: onnx SalMM time / torch SalMM time,
goal <= 1). Goals (issue 25): ratio_floor <= 4, speedup_vs_eager >= 3, e2e_fps_k8 >= 30,
train_step_speedup >= 2. Without ``--checkpoint`` the model is a random SalMM (gamma 1e-2) and
CLIP has random weights: the refresh rows then only show the mechanism.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.timing import time_side_by_side
from pipeline.core.cpu import intra_op_threads
from pipeline.datasets.synthetic import write_dataset
from salmm import stream as stream_command
from salmm.data.sources import open_video, video_items
from salmm.deploy import live as stream_module
from salmm.deploy.graphs import export
from salmm.deploy.options import ExportOptions
from salmm.evaluation import metrics
from salmm.model.loading import load_model
from salmm.model.net import SalMM

SIZE = (256, 256)
REFRESH = (1, 8, 16)
GOAL_CC = 0.99

log = logging.getLogger("bench.realtime")


def synthetic_video(work: Path, frames: int) -> Path:
    """A 1280x720 MJPG AVI of ``frames`` synthetic TrafficGaze frames (30 fps)."""
    video = work / "drive.avi"
    if video.exists():
        return video
    raw = write_dataset("trafficgaze", work / "raw", videos=1, frames=frames + 5)
    files = sorted((raw / "trafficframe" / "01").glob("*.jpg"))[:frames]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (1280, 720))
    for file in files:
        writer.write(cv2.resize(cv2.imread(str(file)), (1280, 720)))
    writer.release()
    return video


def random_checkpoint(work: Path) -> Path:
    """An official-format checkpoint of a random SalMM whose CLIP input matters (gamma 1e-2)."""
    from salmm.model.official import save_official
    path = work / "model_best_random_256x256.tar"
    if not path.exists():
        torch.manual_seed(0)
        model = SalMM(backend="builtin")
        torch.nn.init.constant_(model.CrossModelAtt.gamma, 1e-2)
        save_official(path, model, epoch=0, valid_loss=0.0)
    return path


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU clock ticks of the machine so far (/proc/stat; (0, 0) elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7]


def matmul_gflops(repeats: int) -> float:
    """This process's float32 matrix-product rate on one thread (512^3, best of ``repeats``)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    best = min(time_side_by_side({"mm": lambda: torch.mm(a, b)}, repeats)["mm"][0]
               for _ in range(3))
    return 2 * 512**3 / best / 1e9


def network_flops(model: torch.nn.Module, frame: torch.Tensor, emb: torch.Tensor) -> int:
    """Multiply-adds x 2 of one forward (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(frame, emb)
    return counter.get_total_flops()


def salmm_alone(checkpoint: str, clip: dict, repeats: int) -> dict:
    """One thread, batch 1: the fused kernels and the eager module path, in turn."""
    loaded = load_model(checkpoint, inline_clip=False, given_clip=clip, device="cpu")
    fused = loaded.model.eval()
    eager = SalMM(backend="builtin").eval()
    eager.load_state_dict(fused.state_dict())
    frame, emb = torch.rand(1, 3, *SIZE), torch.randn(1, 512)
    with intra_op_threads(1):
        with torch.inference_mode():
            times = time_side_by_side({"fused": lambda: fused(frame, emb),
                                       "eager": lambda: eager(frame, emb)}, repeats)
            difference = float((fused(frame, emb) - eager(frame, emb)).abs().max())
        gflops = matmul_gflops(repeats)
    flops = network_flops(eager, frame, emb)
    return {"fused_ms": 1e3 * times["fused"][1], "eager_ms": 1e3 * times["eager"][1],
            "flops": flops, "matmul_gflops": gflops, "floor_ms": flops / gflops / 1e6,
            "max_difference": difference}


def alone(checkpoint: str, clip: dict, folder: Path, video: Path, repeats: int) -> list[dict]:
    """SalMM and CLIP alone, both backends, one thread and the default."""
    loaded = load_model(checkpoint, inline_clip=False, given_clip=clip, device="cpu")
    capture, _, _ = open_video(str(video))
    frame = next(video_items(str(video), capture, SIZE)).model_input
    capture.release()
    rows = []
    for threads in sorted({1, torch.get_num_threads()}):
        with intra_op_threads(threads):
            rows += _alone_rows(loaded, folder, frame, threads, repeats)
    return rows


def _alone_rows(loaded, folder: Path, frame: np.ndarray, threads: int, repeats: int
                ) -> list[dict]:
    """:func:`alone`'s rows at ``threads`` intra-op threads."""
    onnx = stream_module.OnnxRunner(folder, threads, loaded, SIZE)
    runners = {"torch": stream_module.TorchRunner(loaded), "onnx": onnx}
    steps = {}
    for name, runner in runners.items():
        embedding = runner.embed(frame)
        steps[f"{name} salmm"] = lambda r=runner, e=embedding: r.saliency(frame, e)
        steps[f"{name} clip"] = lambda r=runner: r.embed(frame)
    steps["onnxruntime graph"] = lambda o=onnx, e=embedding: o._onnx_saliency(frame, e)
    times = time_side_by_side(steps, repeats)
    return [{"backend": name, "threads": threads,
             "salmm_ms": 1e3 * times[f"{name} salmm"][1],
             "clip_ms": 1e3 * times[f"{name} clip"][1],
             "engine": getattr(runner, "engine", "torch"),
             "graph_ms": 1e3 * times["onnxruntime graph"][1]} for name, runner in runners.items()]


def train_step(repeats: int, batch: int = 8) -> dict:
    """One cached-CLIP training step (forward, BCE, backward, the trainer's fused Adam with the
    default learning rate and weight decay) on the training path and on the module path, the
    same weights and batch, in turn; the trainer's one thread."""
    from salmm.training.config import TrainConfig
    from salmm.training.loop import bce_loss
    from salmm.training.trainer import build_optimizer
    torch.manual_seed(0)
    models = {"training": SalMM(backend="auto"), "modules": SalMM(backend="builtin")}
    models["modules"].load_state_dict(models["training"].state_dict())
    frames, emb = torch.rand(batch, 3, *SIZE), torch.randn(batch, 512)
    labels = torch.rand(batch, 1, *SIZE)

    def stepper(model):
        optimizer = build_optimizer(TrainConfig(prepared=""), model)

        def step():
            loss = bce_loss(model(frames, emb), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    with intra_op_threads(1):
        times = time_side_by_side({name: stepper(m) for name, m in models.items()}, repeats)
    return {name: 1e3 * t[1] for name, t in times.items()}


def refresh_accuracy(checkpoint: str, clip: dict, video: Path, frames: int) -> list[dict]:
    """CC and KLD of K > 1 predictions against K = 1 (torch backend)."""
    loaded = load_model(checkpoint, inline_clip=False, given_clip=clip, device="cpu")
    runner = stream_module.TorchRunner(loaded)
    predictions = {}
    for k in REFRESH:
        capture, _, _ = open_video(str(video))
        maps: list[np.ndarray] = []
        stream_module.run_loop(runner, video_items(str(video), capture, SIZE), k,
                               lambda item, saliency, status, out=maps: out.append(saliency),
                               limit=frames)
        capture.release()
        predictions[k] = maps
    rows = []
    for k in REFRESH[1:]:
        ccs = [metrics.cc(a, b) for a, b in zip(predictions[k], predictions[1])]
        klds = [metrics.kl_divergence(a, b) for a, b in zip(predictions[k], predictions[1])]
        rows.append({"k": k, "cc_mean": float(np.mean(ccs)), "cc_worst": float(np.min(ccs)),
                     "kld_mean": float(np.mean(klds))})
    return rows


def end_to_end(checkpoint: str, clip_args: list[str], folder: Path, video: Path, work: Path,
               frames: int) -> list[dict]:
    rows = []
    for backend in ("torch", "onnx"):
        for k in REFRESH:
            argv = ["--checkpoint", checkpoint, "--input", str(video), "--refresh-every", str(k),
                    "--backend", backend, "--out", str(work / f"overlay-{backend}-{k}.mp4"),
                    "--limit", str(frames), *clip_args]
            if backend == "onnx":
                argv += ["--onnx", str(folder)]
            summary = stream_module.stream(stream_command.parse_args(argv))
            rows.append({"backend": backend, "k": k, "fps": summary["fps"],
                         "p50": summary["latency_ms"]["p50"],
                         "p95": summary["latency_ms"]["p95"],
                         "engine": summary["salmm_engine"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--checkpoint", help="a trained checkpoint (default: random weights)")
    parser.add_argument("--work", help="folder for the video and the export (default: temp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-realtime-"))
    work.mkdir(parents=True, exist_ok=True)
    video = synthetic_video(work, args.frames)
    checkpoint = args.checkpoint or str(random_checkpoint(work))
    clip = {} if args.checkpoint else {"clip_pretrained": None}
    clip_args = [] if args.checkpoint else ["--clip-pretrained", "none"]
    folder = work / "onnx"
    if not (folder / "export.json").exists():
        export(ExportOptions(checkpoint=checkpoint, out=str(folder), size=SIZE,
                             clip=tuple(clip.items())))

    ticks = cpu_ticks()
    model = salmm_alone(checkpoint, clip, args.repeats)
    e2e = end_to_end(checkpoint, clip_args, folder, video, work, args.frames)
    single = alone(checkpoint, clip, folder, video, args.repeats)
    training = train_step(max(3, args.repeats // 4))
    refresh = refresh_accuracy(checkpoint, clip, video, args.frames)
    total, stolen = (b - a for a, b in zip(ticks, cpu_ticks()))

    print(f"realtime: batch 1, {SIZE[1]}x{SIZE[0]}, {args.frames} frames of a 1280x720 video,"
          f" {torch.get_num_threads()} default threads, "
          f"{'checkpoint ' + checkpoint if args.checkpoint else 'random weights'}; the"
          f" hypervisor took {100 * stolen / max(total, 1):.0f}% of the CPU time (steal)")
    print(f"SalMM alone, one thread: fused kernels {model['fused_ms']:.1f} ms, eager modules"
          f" {model['eager_ms']:.1f} ms (max difference {model['max_difference']:.1e}); floor"
          f" {model['floor_ms']:.1f} ms = {model['flops'] / 1e6:.0f} MFLOP at"
          f" {model['matmul_gflops']:.1f} GFLOP/s (float32 matmul, one thread)")
    print("end to end (decode, resize, CLIP every K, SalMM, overlay into an MP4):")
    for row in e2e:
        print(f"  {row['backend']:5s} K={row['k']:<3d} {row['fps']:6.1f} fps   latency p50"
              f" {row['p50']:6.1f} ms  p95 {row['p95']:6.1f} ms   SalMM on {row['engine']}")
    print("alone (median of batch-1 calls):")
    for row in single:
        print(f"  {row['backend']:5s} {row['threads']} thread(s): SalMM {row['salmm_ms']:6.1f} ms"
              f" ({1e3 / row['salmm_ms']:5.1f} fps, {row['engine']})   CLIP {row['clip_ms']:6.1f}"
              f" ms   (onnxruntime's SalMM graph: {row['graph_ms']:.1f} ms)")
    print(f"training step, batch 8, one thread: training path {training['training']:.0f} ms,"
          f" module path {training['modules']:.0f} ms")
    print("refresh against K=1 (torch):")
    for row in refresh:
        print(f"  K={row['k']:<3d} CC mean {row['cc_mean']:.4f} (worst frame {row['cc_worst']:.4f})"
              f"   KLD mean {row['kld_mean']:.4f}")
    k8 = max(r["fps"] for r in e2e if r["k"] == 8 and r["backend"] == "torch")
    default = max(r["threads"] for r in single)
    pick = {r["backend"]: r["salmm_ms"] for r in single if r["threads"] == default}
    print(f"realtime: salmm_ms={model['fused_ms']:.2f} floor_ms={model['floor_ms']:.2f}"
          f" ratio_floor={model['fused_ms'] / model['floor_ms']:.2f}"
          f" speedup_vs_eager={model['eager_ms'] / model['fused_ms']:.2f}"
          f" e2e_fps_k8={k8:.1f} onnx_vs_torch={pick['onnx'] / pick['torch']:.2f}"
          f" train_step_speedup={training['modules'] / training['training']:.2f}")
    (work / "realtime.json").write_text(json.dumps(
        {"salmm": model, "end_to_end": e2e, "alone": single, "training_ms": training,
         "refresh": refresh}, indent=1))


if __name__ == "__main__":
    main()
