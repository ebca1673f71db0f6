"""Speed of the selective scan implementations against the sequential reference loop, side by side.

Run: ``python -m bench.scan [--repeats 7] [--threads N]``

Shapes are the model's largest Mamba call (SalMM at 256x256: encoder4 runs on the 32x32 map,
sequence 1024, d_inner 12, d_state 16) at batch 8. Each timing is forward + backward of the
full ``selective_scan`` call (softplus, delta_bias, D skip and SiLU gate included) for the
reference loop, the chunked PyTorch scan (``impl="torch"``) and the fused numba kernels
(``impl="numba"``); they run in turn so they share the machine's load, and min and median of
the repeats are printed with the speed-up over the loop. The goal (>= 20x) is for the path
the model takes on CPU (``impl="auto"``). A second table times the call the model really
makes: both Mamba directions as one grouped scan (leading group dim 2, see salmm/mamba.py)
against the reference loop run once per direction. Last, one SalMM forward + backward at
batch 8, 256x256, on either scan.
"""

from __future__ import annotations

import argparse
import functools
import logging
from unittest import mock

import torch

import salmm.model.mamba
from bench.timing import time_side_by_side
from salmm.model.net import SalMM
from salmm.model.scan import resolve_impl, selective_scan, selective_scan_ref

log = logging.getLogger("bench.scan")

GOAL = 20.0  # speed-up over the loop asked of the path the model uses on CPU
IMPLS = {"chunked PyTorch": "torch", "fused numba": "numba"}


def scan_inputs(batch=8, d_inner=12, length=1024, d_state=16, seed=0):
    """Random inputs with the value ranges a trained Mamba sees (A < 0, small delta)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    A = (-torch.exp(torch.randn(d_inner, d_state, generator=gen))).requires_grad_()
    return {
        "u": rand(batch, d_inner, length),
        "delta": rand(batch, d_inner, length, scale=0.5),
        "A": A,
        "B": rand(batch, d_state, length),
        "C": rand(batch, d_state, length),
        "D": rand(d_inner),
        "z": rand(batch, d_inner, length),
        "delta_bias": rand(d_inner, scale=0.5),
    }


def grouped(inputs_per_group):
    """Stack per-direction inputs along a group dim (dim 0 for A, D, delta_bias; else 1)."""
    return {
        k: torch.stack(
            [g[k].detach() for g in inputs_per_group],
            dim=0 if k in ("A", "D", "delta_bias") else 1,
        ).requires_grad_()
        for k in inputs_per_group[0]
    }


def scan_step(fn, inputs):
    def step():
        out = fn(**inputs, delta_softplus=True)
        out.sum().backward()

    return step


def ref_per_group_step(inputs):
    """The reference loop once per group (it has no group dim), summed as one loss."""

    def step():
        loss = 0.0
        for i in range(inputs["A"].shape[0]):
            one = {k: v[i] if k in ("A", "D", "delta_bias") else v[:, i] for k, v in inputs.items()}
            loss = loss + selective_scan_ref(**one, delta_softplus=True).sum()
        loss.backward()

    return step


def report_scan(title, timed, goal_name):
    """Print the timings (the first is the reference loop), each one's speed-up over the
    reference, and the speed-up of ``goal_name`` beside the goal."""
    log.info("%s (min / median):", title)
    ref_min, ref_med = next(iter(timed.values()))
    for i, (name, (best, median)) in enumerate(timed.items()):
        gain = f"{ref_min / best:6.1f}x / {ref_med / median:6.1f}x" if i else ""
        log.info("  %-40s %8.2f / %8.2f ms  %s", name, best * 1e3, median * 1e3, gain)
    best, median = timed[goal_name]
    log.info(
        "  goal >= %.0fx for the CPU path (%s): %.1fx (min), %.1fx (median)",
        GOAL,
        goal_name,
        ref_min / best,
        ref_med / median,
    )


def model_step(model, frames, emb, impl):
    """One forward + backward of the model with its Mamba blocks on scan ``impl``."""
    scan = functools.partial(selective_scan, impl=impl)

    def step():
        model.zero_grad(set_to_none=True)
        with mock.patch.object(salmm.model.mamba, "selective_scan", scan):
            model(frames, emb).mean().backward()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    log.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())

    cpu_impl = resolve_impl("auto", torch.device("cpu"))
    goal_name = next(name for name, impl in IMPLS.items() if impl == cpu_impl)

    inputs = scan_inputs()
    steps = {"sequential loop (selective_scan_ref)": scan_step(selective_scan_ref, inputs)}
    for name, impl in IMPLS.items():
        steps[name] = scan_step(functools.partial(selective_scan, impl=impl), inputs)
    title = "selective scan fwd+bwd, batch 8, L 1024, d_inner 12, d_state 16"
    report_scan(title, time_side_by_side(steps, args.repeats), goal_name)

    both = grouped([scan_inputs(seed=0), scan_inputs(seed=1)])
    steps = {"sequential loop, once per direction": ref_per_group_step(both)}
    for name, impl in IMPLS.items():
        steps[f"{name}, one grouped call"] = scan_step(
            functools.partial(selective_scan, impl=impl), both
        )
    title = "both directions (group dim 2), batch 8, L 1024, d_inner 12, d_state 16"
    report_scan(title, time_side_by_side(steps, args.repeats), f"{goal_name}, one grouped call")

    torch.manual_seed(0)
    model = SalMM(backend="builtin")
    frames = torch.rand(8, 3, 256, 256)
    emb = torch.randn(8, 512)
    steps = {name: model_step(model, frames, emb, impl) for name, impl in IMPLS.items()}
    timed = time_side_by_side(steps, max(3, args.repeats // 2))
    log.info("SalMM fwd+bwd, batch 8, 256x256, cached embedding (min / median):")
    for name, (best, median) in timed.items():
        log.info("  on the %-30s %8.0f / %8.0f ms", f"{name} scan", best * 1e3, median * 1e3)


if __name__ == "__main__":
    main()
