"""Selective scan in Triton, forward and backward: salmm's scan on any NVIDIA GPU with nothing
but ``pip install`` (Triton ships with torch; no CUDA toolkit, no compiled extension).

Same arguments, shapes and leading group dims as :func:`salmm.model.scan.selective_scan` (whose
``impl="triton"`` calls :func:`scan` here); :func:`salmm.model.scan.selective_scan_ref` is the
``_ref`` twin the parity tests hold it to. With ``TRITON_INTERPRET=1`` set before this module
is imported, Triton runs the same kernels on CPU tensors (slowly): CI tests their logic that
way on every landing.

How it computes. One program owns ``BLOCK_D`` channels of one sequence (a batch row of one
group) and all ``n`` states, and walks its sequence in chunks of ``BLOCK_L`` steps. Within a
chunk the recurrence ``h_t = a_t h_{t-1} + b_t`` (a = exp(dt A) in (0, 1], b = dt u B) is one
``tl.associative_scan`` over the time axis of a [BLOCK_D, n, BLOCK_L] tile, whose pairs
(a, b) compose as (a1 a2, a2 b1 + b2); the state entering the chunk enters through the scan's
running product of decays. Only products of decays are formed, as in the sequential loop, so
nothing overflows. States and sums are float32 (float64 for float64 inputs) whatever the
input dtype (bf16 and fp16 inputs are read and widened).

The forward keeps the state entering every chunk ([rows, d, n, chunks], 1/BLOCK_L of the
states) for the backward, which walks the chunks in reverse: it rebuilds the chunk's states
h_{t-1} from the kept one (a scan over the inputs shifted by a step), then runs the adjoint
``g_t = C_t gy_t + a_{t+1} g_{t+1}`` as a reverse scan carried from chunk to chunk. Sums over
channels (the gradients of B and C) are written per channel block and summed afterwards, sums
over time and batch (A, D, the dt bias) per row: no atomics, so gradients are deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK_L", "scan"]

BLOCK_L = 16
"""Time steps per chunk (one associative scan)."""
_MAX_BLOCK_D = 16  # channels per program: SalM^2's d_inner is 4..16, so one block per sequence


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """log(1 + e^x), as torch (x itself above 20)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _step_inputs(u_ptr, dl_ptr, b_ptr, row, t, d, n, bias, a, L, DIM, N,
                 SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """Step t's (decay, drive, dt, u, pre-softplus delta) for a [BD] x [BN] x [BL] tile:
    decay = exp(dt A) [BD, BN, BL], drive = dt u B [BD, BN, BL], dt, u, dl [BD, BL].
    Outside the sequence (t < 0 or t >= L) dt = 0: decay 1, no drive."""
    tin = (t >= 0) & (t < L)
    dmask = (d < DIM)[:, None] & tin[None, :]
    off = row * DIM * L + d[:, None] * L + t[None, :]
    u = tl.load(u_ptr + off, mask=dmask, other=0.0).to(ACC)
    dl = tl.load(dl_ptr + off, mask=dmask, other=0.0).to(ACC) + bias[:, None]
    dt = dl
    if SOFTPLUS:
        dt = _softplus(dl)
    dt = tl.where(dmask, dt, 0.0)
    bt = tl.load(b_ptr + row * N * L + n[:, None] * L + t[None, :],
                 mask=(n < N)[:, None] & tin[None, :], other=0.0).to(ACC)
    decay = tl.exp(dt[:, None, :] * a[:, :, None])
    drive = (dt * u)[:, None, :] * bt[None, :, :]
    return decay, drive, dt, u, dl


@triton.jit
def _parameters(a_ptr, bias_ptr, dskip_ptr, g, d, n, DIM, N, HAS_BIAS: tl.constexpr,
                HAS_D: tl.constexpr, ACC: tl.constexpr, BD: tl.constexpr):
    """Group ``g``'s parameters for channels d and states n: the [BD, BN] mask of real
    (channel, state) pairs, A [BD, BN], the dt bias [BD] and D [BD] (zeros when absent)."""
    dn = (d < DIM)[:, None] & (n < N)[None, :]
    a = tl.load(a_ptr + g * DIM * N + d[:, None] * N + n[None, :], mask=dn, other=0.0).to(ACC)
    bias = tl.zeros([BD], ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + g * DIM + d, mask=d < DIM, other=0.0).to(ACC)
    dskip = tl.zeros([BD], ACC)
    if HAS_D:
        dskip = tl.load(dskip_ptr + g * DIM + d, mask=d < DIM, other=0.0).to(ACC)
    return dn, a, bias, dskip


@triton.jit
def _fwd_kernel(u_ptr, dl_ptr, a_ptr, b_ptr, c_ptr, dskip_ptr, z_ptr, bias_ptr, out_ptr,
                keep_ptr, L, DIM, N, G, CHUNKS,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, KEEP: tl.constexpr, ACC: tl.constexpr,
                BD: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    row = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    lane = tl.arange(0, BL)
    dn, a, bias, dskip = _parameters(a_ptr, bias_ptr, dskip_ptr, row % G, d, n, DIM, N,
                                     HAS_BIAS, HAS_D, ACC, BD)
    carry = tl.zeros([BD, BN], ACC)
    for chunk in range(CHUNKS):
        t = chunk * BL + lane
        if KEEP:
            tl.store(keep_ptr + ((row * DIM + d[:, None]) * N + n[None, :]) * CHUNKS + chunk,
                     carry, mask=dn)
        decay, drive, _, u, _ = _step_inputs(u_ptr, dl_ptr, b_ptr, row, t, d, n, bias, a,
                                             L, DIM, N, SOFTPLUS, ACC)
        grow, h = tl.associative_scan((decay, drive), 2, _combine)
        h = h + grow * carry[:, :, None]
        ct = tl.load(c_ptr + row * N * L + n[:, None] * L + t[None, :],
                     mask=(n < N)[:, None] & (t < L)[None, :], other=0.0).to(ACC)
        y = tl.sum(h * ct[None, :, :], 1) + dskip[:, None] * u
        off = row * DIM * L + d[:, None] * L + t[None, :]
        mask = (d < DIM)[:, None] & (t < L)[None, :]
        if HAS_Z:
            zt = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC)
            y = y * zt / (1.0 + tl.exp(-zt))
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)
        carry = tl.sum(tl.where(lane[None, None, :] == BL - 1, h, 0.0), 2)


@triton.jit
def _bwd_kernel(u_ptr, dl_ptr, a_ptr, b_ptr, c_ptr, dskip_ptr, z_ptr, bias_ptr, keep_ptr,
                gout_ptr, gu_ptr, gdl_ptr, gz_ptr, ga_ptr, gb_ptr, gc_ptr, gd_ptr, gbias_ptr,
                L, DIM, N, G, CHUNKS, ROWS,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
                BD: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    d = block * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    lane = tl.arange(0, BL)
    dn, a, bias, dskip = _parameters(a_ptr, bias_ptr, dskip_ptr, row % G, d, n, DIM, N,
                                     HAS_BIAS, HAS_D, ACC, BD)
    g_later = tl.zeros([BD, BN], ACC)  # the adjoint at the first step of the later chunk
    ga = tl.zeros([BD, BN], ACC)
    gd = tl.zeros([BD], ACC)
    gbias = tl.zeros([BD], ACC)
    for back in range(CHUNKS):
        chunk = CHUNKS - 1 - back
        t = chunk * BL + lane
        mask = (d < DIM)[:, None] & (t < L)[None, :]
        off = row * DIM * L + d[:, None] * L + t[None, :]
        nl = (n < N)[:, None] & (t < L)[None, :]
        # the states before each step: a scan of the inputs one step back, from the kept state
        entering = tl.load(keep_ptr + ((row * DIM + d[:, None]) * N + n[None, :]) * CHUNKS
                           + chunk, mask=dn, other=0.0)
        decay_p, drive_p, _, _, _ = _step_inputs(u_ptr, dl_ptr, b_ptr, row, t - 1, d, n, bias,
                                                 a, L, DIM, N, SOFTPLUS, ACC)
        first = (lane == 0)[None, None, :]
        decay_p = tl.where(first, 1.0, decay_p)
        drive_p = tl.where(first, 0.0, drive_p)
        grow, h_prev = tl.associative_scan((decay_p, drive_p), 2, _combine)
        h_prev = h_prev + grow * entering[:, :, None]
        decay, drive, dt, u, dl = _step_inputs(u_ptr, dl_ptr, b_ptr, row, t, d, n, bias, a,
                                               L, DIM, N, SOFTPLUS, ACC)
        h = decay * h_prev + drive
        bt = tl.load(b_ptr + row * N * L + n[:, None] * L + t[None, :], mask=nl,
                     other=0.0).to(ACC)
        ct = tl.load(c_ptr + row * N * L + n[:, None] * L + t[None, :], mask=nl,
                     other=0.0).to(ACC)
        gy = tl.load(gout_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_Z:
            zt = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC)
            sig = 1.0 / (1.0 + tl.exp(-zt))
            y = tl.sum(h * ct[None, :, :], 1) + dskip[:, None] * u
            tl.store(gz_ptr + off, (gy * y * sig * (1.0 + zt * (1.0 - sig))).to(
                gz_ptr.dtype.element_ty), mask=mask)
            gy = gy * zt * sig
        # adjoint: g_t = C_t gy_t + a_{t+1} g_{t+1}, carried in from the later chunk
        decay_n, _, _, _, _ = _step_inputs(u_ptr, dl_ptr, b_ptr, row, t + 1, d, n, bias, a,
                                           L, DIM, N, SOFTPLUS, ACC)
        shrink, gh = tl.associative_scan((decay_n, gy[:, None, :] * ct[None, :, :]), 2,
                                         _combine, reverse=True)
        gh = gh + shrink * g_later[:, :, None]
        g_later = tl.sum(tl.where(lane[None, None, :] == 0, gh, 0.0), 2)
        # per-channel-block sums over d: dL/dC and dL/dB at each step
        gc = tl.sum(gy[:, None, :] * h, 0)
        gb = tl.sum(gh * (dt * u)[:, None, :], 0)
        part = ((block * ROWS + row) * N + n[:, None]) * L + t[None, :]
        tl.store(gc_ptr + part, gc, mask=nl)
        tl.store(gb_ptr + part, gb, mask=nl)
        gdtu = tl.sum(gh * bt[None, :, :], 1)  # dL/d(dt u)
        w = gh * h_prev * decay  # dL/d(dt A)
        ga += tl.sum(w * dt[:, None, :], 2)
        gdt = gdtu * u + tl.sum(w * a[:, :, None], 1)
        tl.store(gu_ptr + off, (gdtu * dt + gy * dskip[:, None]).to(gu_ptr.dtype.element_ty),
                 mask=mask)
        if SOFTPLUS:
            gdt = gdt / (1.0 + tl.exp(-dl))
        gdt = tl.where(mask, gdt, 0.0)
        tl.store(gdl_ptr + off, gdt.to(gdl_ptr.dtype.element_ty), mask=mask)
        gbias += tl.sum(gdt, 1)
        gd += tl.sum(tl.where(mask, gy * u, 0.0), 1)
    tl.store(ga_ptr + (row * DIM + d[:, None]) * N + n[None, :], ga, mask=dn)
    tl.store(gd_ptr + row * DIM + d, gd, mask=d < DIM)
    tl.store(gbias_ptr + row * DIM + d, gbias, mask=d < DIM)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(dim: int, n: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): powers of two covering the state, at most 16 channels a program."""
    return min(triton.next_power_of_2(dim), _MAX_BLOCK_D), triton.next_power_of_2(n)


class _TritonScan(torch.autograd.Function):
    """The scan over rows [R, d, l] whose group is row % G (A, D, bias: [G, ...])."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        rows, dim, length = u.shape
        groups, n = A.shape[0], A.shape[-1]
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        bd, bn = _blocks(dim, n)
        chunks = max(1, math.ceil(length / BLOCK_L))
        keep = torch.empty(rows, dim, n, chunks, device=u.device, dtype=acc)
        out = torch.empty_like(u)
        dummy = u  # stands in for absent optional tensors (never read)
        _fwd_kernel[(rows, triton.cdiv(dim, bd))](
            u, delta, A, B, C, dummy if D is None else D, dummy if z is None else z,
            dummy if delta_bias is None else delta_bias, out, keep,
            length, dim, n, groups, chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, KEEP=any(ctx.needs_input_grad), ACC=_tl_dtype(acc),
            BD=bd, BN=bn, BL=BLOCK_L)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, keep)
        ctx.softplus = softplus
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, delta_bias, keep = ctx.saved_tensors
        rows, dim, length = u.shape
        groups, n = A.shape[0], A.shape[-1]
        acc = keep.dtype
        bd, bn = _blocks(dim, n)
        blocks = triton.cdiv(dim, bd)
        gu, gdl = torch.empty_like(u), torch.empty_like(delta)
        gz = torch.empty_like(z) if z is not None else None
        ga = torch.empty(rows, dim, n, device=u.device, dtype=acc)
        gb = torch.empty(blocks, rows, n, length, device=u.device, dtype=acc)
        gc = torch.empty_like(gb)
        gd = torch.empty(rows, dim, device=u.device, dtype=acc)
        gbias = torch.empty_like(gd)
        dummy = u
        _bwd_kernel[(rows, blocks)](
            u, delta, A, B, C, dummy if D is None else D, dummy if z is None else z,
            dummy if delta_bias is None else delta_bias, keep, gout.contiguous(),
            gu, gdl, dummy if gz is None else gz, ga, gb, gc, gd, gbias,
            length, dim, n, groups, keep.shape[-1], rows,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus, ACC=_tl_dtype(acc), BD=bd, BN=bn, BL=BLOCK_L)

        def per_group(t, like):  # [R, ...] summed over the batch rows of each group
            return t.view(-1, groups, *t.shape[1:]).sum(0).to(like.dtype)

        return (gu, gdl, per_group(ga, A), gb.sum(0).to(B.dtype), gc.sum(0).to(C.dtype),
                None if D is None else per_group(gd, D), gz,
                None if delta_bias is None else per_group(gbias, delta_bias), None)


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
         z: Tensor | None = None, delta_bias: Tensor | None = None,
         delta_softplus: bool = False) -> Tensor:
    """:func:`salmm.model.scan.selective_scan` in Triton (see the module docstring): u, delta,
    z [b, *g, d, l]; B, C [b, *g, n, l]; A [*g, d, n]; D, delta_bias [*g, d]. Returns
    [b, *g, d, l] in u's dtype; differentiable in every tensor argument. CUDA tensors, or any
    tensors under ``TRITON_INTERPRET=1``."""
    *lead, dim, length = u.shape
    group_shape = A.shape[:-2]
    groups, n = math.prod(group_shape), A.shape[-1]
    if tuple(lead[1:]) != tuple(group_shape) or B.shape[:-2] != u.shape[:-2]:
        raise ValueError(f"scan shapes do not match: u {tuple(u.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")

    def rows(t, width):  # [b, *g, width, l] -> [R, width, l], contiguous
        return t.reshape(-1, width, length).contiguous()

    def per_group(t):
        return None if t is None else t.reshape(groups, *t.shape[len(group_shape):]).contiguous()

    out = _TritonScan.apply(rows(u, dim), rows(delta, dim), per_group(A), rows(B, n),
                            rows(C, n), per_group(D), None if z is None else rows(z, dim),
                            per_group(delta_bias), delta_softplus)
    return out.view(u.shape)
