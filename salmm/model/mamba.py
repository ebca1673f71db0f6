"""Bidirectional Mamba block, as vendored by SalM^2 (the Vim / VideoMamba ``bimamba`` fork).

One ``in_proj`` and one ``out_proj`` are shared by two branches. The forward branch runs on the
sequence as given (``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``); the backward branch
runs on the time-flipped sequence with its own parameters (``conv1d_b``, ``x_proj_b``,
``dt_proj_b``, ``A_b_log``, ``D_b``) and its result is flipped back. Each branch is::

    x -> causal depthwise conv1d -> SiLU -> x_proj -> (dt, B, C)
    y = selective_scan(x, dt_proj.weight @ dt, -exp(A_log), B, C, D, z,
                       delta_bias=dt_proj.bias, delta_softplus=True)      # y already * SiLU(z)

and the block returns ``out_proj(y_forward + flip(y_backward))``.

What the published numerics are (read from the vendored ``mamba_simple.py``, the path SalMM
takes: ``use_fast_path=True``, ``bimamba=True``): two calls of ``mamba_inner_fn_no_out_proj``,
each gating its own scan output by SiLU of the (flipped, for the backward branch) ``z``; the
two outputs are **summed, not averaged** (no division by 2, unlike VideoMamba's
``if_devide_out`` option), then ``F.linear(..., out_proj.weight, out_proj.bias)``. Because each
branch is gated by the same z, this equals SiLU(z) * (y_f + flip(y_b)) before ``out_proj``.
(The vendored ``bimamba_inner_fn`` / ``bimamba_inner_ref``, which share conv and projections
between directions, are not used by SalMM; the vendored non-fast path, taken only with
``use_fast_path=False`` or a decoding cache, silently drops the backward branch - SalMM never
takes it.)

Backends: ``"builtin"`` runs a depthwise ``conv1d`` and both directions as one grouped
:func:`salmm.model.scan.selective_scan` call - salmm's own scan: the fused numba kernels on CPU,
the Triton kernels on CUDA (:mod:`salmm.model.scan_triton`), the chunked PyTorch scan where
neither imports; ``"export"`` the same call on
:func:`salmm.model.scan.selective_scan_export`, plain tensor operations a tracer can follow, for ONNX
export (forward only); ``"cuda"`` runs mamba-ssm's
``selective_scan_fn`` once per direction and, when installed,
``causal_conv1d_fn`` (install the ``gpu`` extra); ``"auto"`` picks ``"cuda"`` for CUDA inputs
when mamba-ssm imports (else Triton, else the chunked scan: :func:`scan_backend` names it), the fused CPU kernel pair of :mod:`salmm.model.mamba_cpu` for CPU
training (autograd recording; ``"builtin"`` is its ``_ref`` twin), else ``"builtin"``.
Parameters and state_dict are identical.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salmm.model.scan import resolve_impl, selective_scan, selective_scan_export

__all__ = ["BACKENDS", "Mamba", "cuda_kernels_available", "mamba_ssm_scan", "scan_backend"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "builtin", "export", "cuda")
_kernels: dict | None = None


def _load_kernels() -> dict:
    """Import mamba-ssm / causal-conv1d once. Any failure (missing package, missing compiled
    extension, CUDA mismatch) means the kernels are unavailable; the reason is logged."""
    global _kernels
    if _kernels is None:
        _kernels = {}
        try:
            from mamba_ssm.ops.selective_scan_interface import (  # lazy: the gpu extra
                selective_scan_fn,
            )

            _kernels["selective_scan_fn"] = selective_scan_fn
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            log.info("mamba-ssm CUDA kernels unavailable (%s: %s)", type(exc).__name__, exc)
        try:
            from causal_conv1d import causal_conv1d_fn  # lazy: the gpu extra

            _kernels["causal_conv1d_fn"] = causal_conv1d_fn
        except Exception as exc:  # noqa: BLE001
            log.info("causal-conv1d kernel unavailable (%s: %s)", type(exc).__name__, exc)
    return _kernels


@functools.cache
def _mamba_cpu():
    """:mod:`salmm.model.mamba_cpu`, or None when numba does not import (the reason is logged)."""
    try:
        from salmm.model import mamba_cpu  # lazy: numba may be missing; the modules stand in
    except ImportError as exc:
        log.info("fused CPU Mamba unavailable (%s: %s)", type(exc).__name__, exc)
        return None
    return mamba_cpu


def cuda_kernels_available() -> bool:
    """True when CUDA is present and mamba-ssm's selective scan kernel imports."""
    return torch.cuda.is_available() and "selective_scan_fn" in _load_kernels()


def mamba_ssm_scan():
    """mamba-ssm's ``selective_scan_fn`` (CUDA), or None where it does not import."""
    return _load_kernels().get("selective_scan_fn")


SCAN_NAMES = {"numba": "numba", "triton": "triton", "torch": "chunked"}


def scan_backend(device: torch.device | str, backend: str = "auto") -> str:
    """Which scan a Mamba block with ``backend`` runs on ``device``, for logs and records:
    "mamba-ssm" (its CUDA kernels), "triton", "chunked" (the PyTorch scan), "numba" (the CPU
    kernels) or "export". On CUDA, "auto" takes the first that is there in that order."""
    device = torch.device(device)
    if backend == "export":
        return "export"
    if backend in ("auto", "cuda") and device.type == "cuda" and cuda_kernels_available():
        return "mamba-ssm"
    return SCAN_NAMES[resolve_impl("auto", device)]


def _at_least_fp32(t: Tensor) -> Tensor:
    """The published block keeps A, D and the dt bias in float32 (``.float()``); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


class Mamba(nn.Module):
    """Bidirectional Mamba mixer. Input and output: [batch, length, d_model].

    Initialisation follows the vendored module: ``dt_proj`` weight uniform in
    +-dt_rank**-0.5 * dt_scale and bias = softplus^-1(dt) with dt log-uniform in
    [dt_min, dt_max] (floored at dt_init_floor), bias flagged ``_no_reinit``; ``A_log`` and
    ``A_b_log`` = log(1..d_state) per channel; ``D``, ``D_b`` = 1; these four flagged
    ``_no_weight_decay``. ``dt_proj_b`` keeps PyTorch's default Linear init, as published.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        d_inner, proj_out = self.d_inner, self.dt_rank + 2 * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = self._depthwise_conv(conv_bias)
        self.x_proj = nn.Linear(d_inner, proj_out, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        std = self.dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.dt_proj.bias._no_reinit = True
        self.A_log = self._a_log()
        self.D = self._ones()

        self.A_b_log = self._a_log()
        self.conv1d_b = self._depthwise_conv(conv_bias)
        self.x_proj_b = nn.Linear(d_inner, proj_out, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.D_b = self._ones()

        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def _depthwise_conv(self, conv_bias: bool) -> nn.Conv1d:
        return nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=conv_bias,
        )

    def _a_log(self) -> nn.Parameter:
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        param = nn.Parameter(torch.log(a))  # [d_inner, d_state], kept in float32
        param._no_weight_decay = True
        return param

    def _ones(self) -> nn.Parameter:
        param = nn.Parameter(torch.ones(self.d_inner))
        param._no_weight_decay = True
        return param

    def resolved_backend(self, device: torch.device) -> str:
        """The backend a forward on `device` uses: "builtin", "export" or "cuda"."""
        if self.backend in ("builtin", "export"):
            return self.backend
        if device.type == "cuda" and cuda_kernels_available():
            return "cuda"
        if self.backend == "cuda":
            raise RuntimeError(
                "Mamba backend 'cuda' needs CUDA tensors and mamba-ssm's compiled kernels "
                "(pip install 'salmm[gpu]'); use backend='builtin' or 'auto' otherwise"
            )
        return "builtin"

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states: [b, l, d_model] -> [b, l, d_model]."""
        if self._fused_cpu(hidden_states):
            return _mamba_cpu().mamba_forward(self, hidden_states)
        backend = self.resolved_backend(hidden_states.device)
        kernels = _load_kernels() if backend == "cuda" else {}
        xz = self.in_proj(hidden_states).transpose(1, 2).contiguous()  # [b, 2*d_inner, l]
        x, z = xz.chunk(2, dim=1)  # each [b, d_inner, l]
        z_b = z.flip(-1)
        # scan arguments (x, dt, A, B, C, D, delta_bias) of each direction
        fwd = self._scan_args(
            kernels, x, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D
        )
        bwd = self._scan_args(
            kernels,
            x.flip(-1),
            self.conv1d_b,
            self.x_proj_b,
            self.dt_proj_b,
            self.A_b_log,
            self.D_b,
        )
        if backend == "cuda":
            scan = kernels["selective_scan_fn"]
            y_f, y_b = (
                scan(*args[:6], z=gate, delta_bias=args[6], delta_softplus=True)
                for args, gate in ((fwd, z), (bwd, z_b))
            )
        else:  # both directions as one grouped scan (leading dim 2, see salmm.model.scan)
            u, dt, A, B, C, D, dt_bias = (
                torch.stack(pair, dim=1 if pair[0].ndim == 3 else 0) for pair in zip(fwd, bwd)
            )  # u, dt: [b, 2, d_inner, l]; B, C: [b, 2, n, l]; A: [2, d_inner, n]; D: [2, d_inner]
            z2 = torch.stack((z, z_b), dim=1)
            scan = selective_scan_export if backend == "export" else selective_scan
            y = scan(u, dt, A, B, C, D, z=z2, delta_bias=dt_bias, delta_softplus=True)
            y_f, y_b = y.unbind(1)
        y = y_f + y_b.flip(-1)  # [b, d_inner, l], summed as published (no averaging)
        return self.out_proj(y.transpose(1, 2))

    def _fused_cpu(self, x: Tensor) -> bool:
        """Whether this forward runs :mod:`salmm.model.mamba_cpu` (training on a CPU): backend
        "auto", a float32 / float64 CPU input, no CPU autocast, autograd recording, no in_proj
        bias, numba.
        (CPU inference runs whole SCPMamba layers in :mod:`salmm.model.layer_cpu` instead.)"""
        return (self.backend == "auto" and x.device.type == "cpu" and torch.is_grad_enabled()
                and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and self.in_proj.bias is None
                and _mamba_cpu() is not None)

    def _scan_args(self, kernels, x, conv1d, x_proj, dt_proj, A_log, D) -> tuple[Tensor, ...]:
        """One direction's selective-scan inputs from x [b, d_inner, l]: the conv+SiLU output
        [b, d_inner, l], dt [b, d_inner, l] (bias not yet added), A [d_inner, n], B and C
        [b, n, l], D [d_inner] and the dt bias [d_inner]."""
        length = x.shape[-1]
        if "causal_conv1d_fn" in kernels:
            x = kernels["causal_conv1d_fn"](
                x, conv1d.weight.squeeze(1), conv1d.bias, activation="silu"
            )
        else:
            x = F.silu(conv1d(x)[..., :length])  # causal: keep the first l outputs
        x_dbl = x_proj(x.transpose(1, 2))  # [b, l, dt_rank + 2*d_state]
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)  # [b, d_inner, l], bias added in scan
        A = -torch.exp(_at_least_fp32(A_log))  # [d_inner, d_state]
        B = B.transpose(1, 2).contiguous()  # [b, d_state, l]
        C = C.transpose(1, 2).contiguous()
        return x, dt, A, B, C, _at_least_fp32(D), _at_least_fp32(dt_proj.bias)
