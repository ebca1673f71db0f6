"""The GPU check: scan parity, the CLIP cache, training and real-time figures on one CUDA device.

Run: ``python -m bench.gpu [--device cuda] [--small] [--work DIR] [--repeats 10]``

Made to run on a machine with an NVIDIA GPU in a few minutes, without network and against the
torch that machine already has (install the project with ``pip install --no-deps -e .`` and the
few pure-Python wheels it needs; the README's GPU section lists them). Random weights
throughout (CLIP included: the speed of ViT-B/32 does not depend on its weights). In order:

1. **Scan parity**: every selective scan on the device - Triton, the chunked PyTorch scan, and
   mamba-ssm's CUDA kernels when they import - on float32 inputs of SalM^2's shapes (both
   directions as one grouped call, a sequence across several chunks), forward and every
   gradient, against :func:`salmm.model.scan.selective_scan_ref` in float64 on the CPU:
   max |difference| / max |reference| per tensor. Triton on bf16 inputs too (reported apart).
2. **Scan speed**: forward + backward of the model's largest Mamba call (encoder4 at 256x256:
   sequence 1024, d_inner 12, d_state 16, both directions) at batch 32, per scan.
3. **CLIP cache**: :func:`pipeline.encoders.clip.embed_pairs` (frame + flip, what ``embed``
   runs) in fp32 and fp16: images/s and the least cosine between their embeddings.
4. **Training**: the cached-CLIP step (forward, BCE, backward, fused Adam) at batch 32,
   256x256, fp32 and bf16 autocast: samples/s.
5. **Latency**: SalM^2 and CLIP at batch 1, and ``salmm stream`` end to end on a synthetic
   1280x720 video with CLIP on every frame (K = 1; decode, resize and the MP4 encoder are on
   the CPU).

Each row has its peak GPU memory. The last line::

    gpu: device=... parity_max=... scan_ms=... embed_img_s=... train_samples_s_fp32=...
    train_samples_s_bf16=... salmm_b1_ms=... e2e_fps_k1=...

(embed_img_s: fp16, the cache's CUDA default; scan_ms: the scan the model runs). Without a CUDA
device it says so in one line and exits with status 2. ``--device cpu --small`` rehearses the
whole script on tiny sizes on a CPU (with ``TRITON_INTERPRET=1`` the Triton scan runs
interpreted), so it is known to run before a GPU is there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from salmm.model import mamba as mamba_module
from salmm.model.mamba import scan_backend
from salmm.model.net import build_model
from salmm.model.scan import resolve_impl, selective_scan, selective_scan_ref

log = logging.getLogger("bench.gpu")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part runs on (``--small``: a CPU rehearsal)."""

    parity_length: int = 300
    scan_batch: int = 32
    scan_length: int = 1024
    embed_frames: int = 1024
    train_batch: int = 32
    size: int = 256
    video_frames: int = 240


SMALL = Sizes(parity_length=40, scan_batch=2, scan_length=64, embed_frames=16, train_batch=2,
              size=64, video_frames=12)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``step`` (one warm-up call first; the device synchronised)."""
    step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict, key: str = "peak_mib"):
    """Records the peak GPU memory (MiB) allocated inside the block in ``into[key]``."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into[key] = (torch.cuda.max_memory_allocated(device) / 2**20
                 if device.type == "cuda" else float("nan"))


def scan_inputs(batch: int, length: int, dtype: torch.dtype, device: torch.device,
                dim: int = 12, n: int = 16, seed: int = 0) -> dict:
    """A grouped (both directions) call with trained-Mamba ranges: A < 0, small delta."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    values = {"u": rand(batch, 2, dim, length), "delta": rand(batch, 2, dim, length, scale=0.5),
              "A": -torch.exp(rand(2, dim, n)), "B": rand(batch, 2, n, length),
              "C": rand(batch, 2, n, length), "D": rand(2, dim), "z": rand(batch, 2, dim, length),
              "delta_bias": rand(2, dim, scale=0.5)}
    return {k: v.to(device, dtype).requires_grad_() for k, v in values.items()}


def grouped(fn: Callable, values: dict) -> torch.Tensor:
    """``fn`` (a scan over [b, d, l]) once per group, stacked: for scans without groups."""
    outs = [fn(values["u"][:, g], values["delta"][:, g], values["A"][g], values["B"][:, g],
               values["C"][:, g], values["D"][g], values["z"][:, g], values["delta_bias"][g],
               True) for g in range(values["A"].shape[0])]
    return torch.stack(outs, 1)


def scans(device: torch.device) -> dict[str, Callable[[dict], torch.Tensor]]:
    """Every scan that runs on ``device``: name -> fn(inputs) -> output."""
    found = {}
    for impl, name in (("triton", "triton"), ("numba", "numba"), ("torch", "chunked")):
        with contextlib.suppress(RuntimeError):
            resolve_impl(impl, device)
            found[name] = lambda v, impl=impl: selective_scan(**v, delta_softplus=True, impl=impl)
    if device.type == "cuda" and mamba_module.cuda_kernels_available():
        kernel = mamba_module.mamba_ssm_scan()
        found["mamba-ssm"] = lambda v: grouped(
            lambda u, dl, A, B, C, D, z, bias, sp: kernel(
                u, dl, A, B.contiguous(), C.contiguous(), D, z=z, delta_bias=bias,
                delta_softplus=sp), v)
    return found


def forward_backward(fn: Callable, values: dict, grad_out: torch.Tensor) -> list[torch.Tensor]:
    out = fn(values)
    return [out, *torch.autograd.grad(out, [values[k] for k in NAMES], grad_out)]


def parity(device: torch.device, sizes: Sizes) -> list[dict]:
    """Each scan's worst relative difference to the float64 reference, output and gradients."""
    cpu = scan_inputs(2, sizes.parity_length, torch.float64, torch.device("cpu"))
    grad_out = torch.randn(cpu["u"].shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    reference = forward_backward(lambda v: grouped(selective_scan_ref, v), cpu, grad_out)
    rows = []
    cases = [(name, fn, torch.float32) for name, fn in scans(device).items()]
    if "triton" in scans(device):
        cases.append(("triton", scans(device)["triton"], torch.bfloat16))
    for name, fn, dtype in cases:
        values = {k: v.detach().to(device, dtype).requires_grad_() for k, v in cpu.items()}
        got = forward_backward(fn, values, grad_out.to(device, dtype))
        worst = {}
        for label, g, ref in zip(("out", *NAMES), got, reference):
            ref = ref.detach()
            worst[label] = float((g.detach().double().cpu() - ref).abs().max() / ref.abs().max())
        rows.append({"scan": name, "dtype": str(dtype).removeprefix("torch."),
                     "max": max(worst.values()), "worst": max(worst, key=worst.get)})
    return rows


def scan_speed(device: torch.device, sizes: Sizes, repeats: int) -> list[dict]:
    """Forward + backward of the largest Mamba call at batch ``scan_batch``, per scan."""
    values = scan_inputs(sizes.scan_batch, sizes.scan_length, torch.float32, device)
    grad_out = torch.randn_like(values["u"])
    rows = []
    for name, fn in scans(device).items():
        row = {"scan": name}
        with peak_memory(device, row):
            row["ms"] = 1e3 * timed(lambda f=fn: forward_backward(f, values, grad_out), device,
                                    repeats)
        rows.append(row)
    return rows


def frames(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 frames [count, size, size, 3]."""
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def embedding_cache(device: torch.device, sizes: Sizes, repeats: int) -> dict:
    """embed_pairs in fp32 and fp16: images/s (frame + flip) and the least cosine."""
    from pipeline.encoders.clip import ClipSpec, cached_encoder, embed_pairs  # lazy: open_clip
    encoder = cached_encoder(ClipSpec(pretrained=None), str(device))
    batch = frames(sizes.embed_frames, sizes.size)
    out, row = {}, {}
    for precision in ("fp32", "fp16"):
        with peak_memory(device, row, f"peak_mib_{precision}"):
            seconds = timed(lambda p=precision: out.__setitem__(p, embed_pairs(encoder, batch, p)),
                            device, max(1, repeats // 5))
        row[f"img_s_{precision}"] = 2 * sizes.embed_frames / seconds
    a, b = (torch.from_numpy(out[p]).reshape(-1, out[p].shape[-1]) for p in ("fp32", "fp16"))
    row["cosine_min"] = float(torch.nn.functional.cosine_similarity(a, b).min())
    return row


def training(device: torch.device, sizes: Sizes, repeats: int) -> dict:
    """Cached-CLIP training steps at batch ``train_batch``: samples/s in fp32 and bf16. The
    trainer's loss (the authors' BCELoss) and optimizer (fused Adam); the trainer also checks
    every prediction is finite, one more synchronisation a step."""
    torch.manual_seed(0)
    model = build_model(cached_clip=True, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    b, s = sizes.train_batch, sizes.size
    x, emb = torch.rand(b, 3, s, s, device=device), torch.randn(b, 512, device=device)
    labels = torch.rand(b, 1, s, s, device=device)
    row = {"scan": scan_backend(device)}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def step(dtype=dtype):
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                loss = torch.nn.functional.binary_cross_entropy(model(x, emb), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with peak_memory(device, row, f"peak_mib_{name}"):
            row[f"samples_s_{name}"] = b / timed(step, device, repeats)
    return row


def latency(device: torch.device, sizes: Sizes, repeats: int) -> dict:
    """Batch-1 SalM^2 and CLIP (fp32) on the device, inference mode."""
    from pipeline.encoders.clip import ClipSpec, cached_encoder  # lazy: open_clip
    torch.manual_seed(0)
    model = build_model(cached_clip=True, device=device).eval()
    encoder = cached_encoder(ClipSpec(pretrained=None), str(device))
    x = torch.rand(1, 3, sizes.size, sizes.size, device=device)
    emb = torch.randn(1, 512, device=device)
    row = {}
    with torch.inference_mode():
        with peak_memory(device, row, "salmm_peak_mib"):
            row["salmm_ms"] = 1e3 * timed(lambda: model(x, emb), device, repeats)
        with peak_memory(device, row, "clip_peak_mib"):
            row["clip_ms"] = 1e3 * timed(lambda: encoder.encode(x), device, repeats)
    return row


def end_to_end(device: torch.device, sizes: Sizes, work: Path) -> dict:
    """``salmm stream`` with CLIP on every frame on the device (random weights)."""
    from bench.realtime import random_checkpoint, synthetic_video  # lazy: OpenCV, ffmpeg
    from salmm import stream as stream_command
    from salmm.deploy import live
    video = synthetic_video(work, sizes.video_frames)
    checkpoint = random_checkpoint(work)
    argv = ["--checkpoint", str(checkpoint), "--input", str(video), "--refresh-every", "1",
            "--device", str(device), "--clip-pretrained", "none", "--size",
            f"{sizes.size}x{sizes.size}", "--out", str(work / "overlay.mp4")]
    row: dict = {}
    with peak_memory(device, row):
        summary = live.stream(stream_command.parse_args(argv))
    row.update(fps=summary["fps"], p50_ms=summary["latency_ms"]["p50"],
               p95_ms=summary["latency_ms"]["p95"])
    return row


def part(name: str, fn: Callable, *args) -> object | None:
    """``fn(*args)``, or None with one line naming the package this machine lacks for it."""
    try:
        return fn(*args)
    except ModuleNotFoundError as err:
        print(f"  {name}: skipped, this Python lacks the {err.name!r} package (see the README's"
              " GPU section for the wheels to carry)")
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="a CUDA device (default: cuda); cpu"
                        " only with --small, as a rehearsal")
    parser.add_argument("--small", action="store_true", help="tiny sizes (a rehearsal)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure")
    parser.add_argument("--work", help="folder for the synthetic video (default: temporary)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.small:
        print(f"bench.gpu: needs a CUDA device (got --device {args.device}; --small rehearses"
              " on a CPU)", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench.gpu: needs a CUDA device; torch {torch.__version__} sees none",
              file=sys.stderr)
        return 2
    sizes = SMALL if args.small else Sizes()
    repeats = 2 if args.small else args.repeats
    start = time.perf_counter()
    name = device_name(device)
    print(f"bench.gpu on {name}, torch {torch.__version__}; the model's scan:"
          f" {scan_backend(device)}")
    checks = parity(device, sizes)
    for row in checks:
        print(f"  parity {row['scan']:9s} {row['dtype']:8s} max relative difference"
              f" {row['max']:.1e} (worst: {row['worst']})")
    speed = scan_speed(device, sizes, repeats)
    for row in speed:
        print(f"  scan {row['scan']:9s} forward+backward {row['ms']:8.2f} ms"
              f"  peak {row['peak_mib']:.0f} MiB")
    cache = part("CLIP cache", embedding_cache, device, sizes, repeats)
    if cache:
        print(f"  CLIP cache (frame + flip): fp32 {cache['img_s_fp32']:.0f} img/s (peak"
              f" {cache['peak_mib_fp32']:.0f} MiB), fp16 {cache['img_s_fp16']:.0f} img/s (peak"
              f" {cache['peak_mib_fp16']:.0f} MiB), least cosine fp16/fp32"
              f" {cache['cosine_min']:.5f}")
    train = part("training", training, device, sizes, repeats)
    if train:
        print(f"  training, batch {sizes.train_batch} at {sizes.size}x{sizes.size}"
              f" ({train['scan']} scan): fp32 {train['samples_s_fp32']:.0f} samples/s (peak"
              f" {train['peak_mib_fp32']:.0f} MiB), bf16 {train['samples_s_bf16']:.0f}"
              f" samples/s (peak {train['peak_mib_bf16']:.0f} MiB)")
    single = part("batch-1 latency", latency, device, sizes, repeats)
    if single:
        print(f"  batch 1: SalM2 {single['salmm_ms']:.2f} ms (peak"
              f" {single['salmm_peak_mib']:.0f} MiB), CLIP {single['clip_ms']:.2f} ms (peak"
              f" {single['clip_peak_mib']:.0f} MiB)")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as temp:
        work = Path(args.work or temp)
        work.mkdir(parents=True, exist_ok=True)
        e2e = part("end to end", end_to_end, device, sizes, work)
    if e2e:
        print(f"  end to end, CLIP every frame: {e2e['fps']:.1f} fps, latency p50"
              f" {e2e['p50_ms']:.1f} ms, p95 {e2e['p95_ms']:.1f} ms (peak"
              f" {e2e['peak_mib']:.0f} MiB)")
    auto = scan_backend(device)
    auto_ms = next((r["ms"] for r in speed if r["scan"] == auto), math.nan)
    fp32_max = max((r["max"] for r in checks if r["dtype"] == "float32"), default=math.nan)

    def field(row: dict | None, key: str, form: str) -> str:
        return "n/a" if row is None else format(row[key], form)

    print(f"  ({time.perf_counter() - start:.0f} s)")
    print(f"gpu: device={name} parity_max={fp32_max:.1e} scan_ms={auto_ms:.2f}"
          f" embed_img_s={field(cache, 'img_s_fp16', '.0f')}"
          f" train_samples_s_fp32={field(train, 'samples_s_fp32', '.0f')}"
          f" train_samples_s_bf16={field(train, 'samples_s_bf16', '.0f')}"
          f" salmm_b1_ms={field(single, 'salmm_ms', '.2f')}"
          f" e2e_fps_k1={field(e2e, 'fps', '.1f')}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
