"""Selective scan (the S6 recurrence of Mamba): the entry point the model calls, a PyTorch
implementation for any device, and the sequential reference.

All with the argument conventions of ``mamba_ssm.selective_scan_fn``:

* :func:`selective_scan` - what the model calls. ``impl="auto"`` (the default) runs the
  fused numba kernels of :mod:`salmm.model.scan_cpu` for CPU tensors when numba imports, the
  Triton kernels of :mod:`salmm.model.scan_triton` for CUDA tensors when Triton imports, and
  the vectorised PyTorch scan otherwise; ``impl="numba"`` / ``"triton"`` / ``"torch"`` pick
  one. The PyTorch scan has no Python loop over single time steps: time
  is cut into chunks of T = ``CHUNK_LEN`` steps and laid out chunk-interleaved ([T, K, ...]:
  slab t holds step t of all K chunks, one contiguous block), so the linear recurrence
  ``h_t = a_t * h_{t-1} + b_t`` runs as 2T + K in-place ops on whole slabs (see
  :func:`_chunk_scan_`), inside one autograd Function whose backward runs the adjoint
  recurrence the same way.  Only products of decays in (0, 1] are ever formed, so it is as
  stable as the sequential loop (no division by cumulative decays, no exp overflow); the
  decays are computed as exp2(dt * A * log2(e)), torch's exp2 being several times faster
  than its exp on CPU.
* :func:`selective_scan_export` - the same recurrence in plain, out-of-place tensor operations
  a tracer can follow (no Python loop over time steps, no autograd Function, no numba), for
  ``python -m salmm.export``'s ONNX graphs: a parallel scan in groups of
  :data:`EXPORT_GROUP` steps, each group closed by cumulative sums (:func:`_grouped_scan`).
* :func:`selective_scan_ref` - the plain sequential loop, kept beside them as the reference.

Shapes (b batch, d channels, l length, n state size)::

    u:     [b, d, l]   input sequence
    delta: [b, d, l]   time step before ``delta_bias`` / softplus
    A:     [d, n]      (negative) state matrix, diagonal per channel
    B:     [b, n, l]   input-dependent input matrix
    C:     [b, n, l]   input-dependent output matrix
    D:     [d]         skip connection (optional)
    z:     [b, d, l]   gate, output is multiplied by silu(z) (optional)
    delta_bias: [d]    added to delta before softplus (optional)
    returns [b, d, l]  in u's dtype (computed in float32, or float64 for float64 input)

:func:`selective_scan` also takes extra leading dims, so independent scans with their own
parameters run as one call: u, delta, z [b, g, d, l]; B, C [b, g, n, l]; A [g, d, n];
D, delta_bias [g, d] (the bidirectional Mamba block stacks its two directions as g = 2).

Recurrence, per (b, d, n) with h_{-1} = 0::

    dt_t = softplus(delta_t + delta_bias)        (if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = sum_n C_t * h_t + D * u_t,   out = y * silu(z)
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_LEN", "IMPLS", "resolve_impl", "selective_scan", "selective_scan_export",
           "selective_scan_ref", "triton_interpreted"]

log = logging.getLogger(__name__)

IMPLS = ("auto", "numba", "triton", "torch")


CHUNK_LEN = 32  # time steps per chunk (a constant: see selective_scan)
_SLAB = 8  # time slabs per temporary buffer in the backward pass
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); torch's exp2 is several times faster


def _chunk_scan_(x: Tensor, c: Tensor, link: Tensor) -> None:
    """In place: ``x[l] += c[l] * x[l-1]`` for l = 1 .. L-1 in sequence.

    Chunk-interleaved layout: x, c: [T, K, W] with x[t, k] the step l = k*T + t (K chunks
    of T steps, W values per step); link: [K, W], link[k] = prod_t c[t, k], the decay across
    chunk k. Runs the T steps of all chunks at once from a zero start (keeping only each
    chunk's end state), carries the end states from chunk to chunk (a loop over K on [W]
    rows), then reruns the T steps in place from the carried states: 2T + K ops on
    contiguous rows, only products of decays, as in the sequential loop.
    """
    steps, chunks = x.shape[:2]
    end = x[0].clone()
    for t in range(1, steps):
        torch.addcmul(x[t], c[t], end, out=end)
    for k in range(1, chunks):
        end[k].addcmul_(link[k], end[k - 1])
    x[0, 1:].addcmul_(c[0, 1:], end[:-1])
    for t in range(1, steps):
        x[t].addcmul_(c[t], x[t - 1])


def _chunk_rscan_(x: Tensor, c: Tensor, link: Tensor) -> None:
    """In place: ``x[l] += c[l+1] * x[l+1]`` for l = L-2 .. 0 in sequence (the adjoint of
    :func:`_chunk_scan_`, same layout). link: [K-1, W], link[k] = the product of c over
    steps k*T+1 .. k*T+T (from chunk k's first step to chunk k+1's first step)."""
    steps, chunks = x.shape[:2]
    start = x[-1].clone()
    for t in range(steps - 2, -1, -1):
        torch.addcmul(x[t], c[t + 1], start, out=start)
    for k in range(chunks - 2, -1, -1):
        start[k].addcmul_(link[k], start[k + 1])
    x[-1, :-1].addcmul_(c[0, 1:], start[1:])
    for t in range(steps - 2, -1, -1):
        x[t].addcmul_(c[t + 1], x[t + 1])


class _SelectiveScanCore(torch.autograd.Function):
    """y[t, k, b, d] = sum_n C * h with h the recurrence above (no D, no gate, dt final).

    Chunk-interleaved time layout (see :func:`_chunk_scan_`): dt, u: [T, K, *batch, d];
    B, C: [T, K, *batch, n]; A: [..., d, n] broadcast over batch. The decay and state
    tensors [T, K, *batch, d, n] are written once and saved for the backward pass, which
    runs the adjoint recurrence with the same decays. The decay across a whole chunk (the
    link between chunks) is exp(A * sum of the chunk's dt), equal to the product of its
    step decays up to rounding; every exponent is <= 0 for A <= 0, so nothing overflows.
    """

    @staticmethod
    def forward(ctx, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor):
        steps, chunks, dim, n = dt.shape[0], dt.shape[1], dt.shape[-1], A.shape[-1]
        a2 = A * LOG2_E
        dtu = dt * u
        decay = torch.mul(a2, dt.unsqueeze(-1)).exp2_()  # [T, K, *batch, d, n] = exp(dt * A)
        h = torch.mul(dtu.unsqueeze(-1), B.unsqueeze(-2))  # the drive dt*u*B, scanned into h
        link = torch.mul(a2, dt.sum(0).unsqueeze(-1)).exp2_()  # decay across each chunk
        width = decay[0, 0].numel()  # b*d*n values per time step
        _chunk_scan_(
            h.view(steps, chunks, width),
            decay.view(steps, chunks, width),
            link.view(chunks, width),
        )
        y = torch.bmm(h.view(-1, dim, n), C.view(-1, n, 1)).view(dt.shape)
        ctx.save_for_backward(dt, u, A, B, C, decay, h, dtu)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        dt, u, A, B, C, decay, h, dtu = ctx.saved_tensors
        steps, chunks, dim, n = dt.shape[0], dt.shape[1], dt.shape[-1], A.shape[-1]
        width = decay[0, 0].numel()
        gy = gy.contiguous()  # [T, K, *batch, d]
        # g = dL/dh_t: through y_t, then through every later step (adjoint recurrence)
        g = torch.mul(gy.unsqueeze(-1), C.unsqueeze(-2))
        link_dt = dt[1:].sum(0)[:-1] + dt[0, 1:]  # steps k*T+1 .. k*T+T
        link = torch.mul(A * LOG2_E, link_dt.unsqueeze(-1)).exp2_()
        _chunk_rscan_(
            g.view(steps, chunks, width),
            decay.view(steps, chunks, width),
            link.view(chunks - 1, width),
        )
        gC, gB = torch.empty_like(C), torch.empty_like(B)
        gdtu, gdt = torch.empty_like(dt), torch.empty_like(dt)
        gA = torch.zeros_like(A)
        # h_{l-1} for every step l: [t-1, k], or [T-1, k-1] for t = 0 (h_{-1} = 0)
        h_first_prev = torch.cat([torch.zeros_like(h[-1, :1]), h[-1, :-1]])
        buf = g.new_empty(min(_SLAB, steps), *g.shape[1:])
        # the gradients a few slabs at a time, while they are in cache
        for s in range(0, steps, _SLAB):
            e = min(s + _SLAB, steps)
            gs, tmp = g[s:e], buf[: e - s]
            torch.sum(torch.mul(h[s:e], gy[s:e].unsqueeze(-1), out=tmp), -2, out=gC[s:e])
            torch.sum(torch.mul(gs, dtu[s:e].unsqueeze(-1), out=tmp), -2, out=gB[s:e])
            torch.bmm(gs.view(-1, dim, n), B[s:e].view(-1, n, 1), out=gdtu[s:e].view(-1, dim, 1))
            # dL/d(dt_l A) = g_l h_{l-1} decay_l, built in g's buffer
            if s:
                gs.mul_(h[s - 1 : e - 1])
            else:
                gs[1:].mul_(h[: e - 1])
                gs[0].mul_(h_first_prev)
            w = gs.mul_(decay[s:e])
            gA += torch.mul(w, dt[s:e].unsqueeze(-1), out=tmp).sum_to_size(A.shape)
            torch.sum(w.mul_(A), -1, out=gdt[s:e])
        gdt.addcmul_(gdtu, u)
        gu = gdtu * dt
        return gdt, gu, gA, gB, gC


@functools.cache
def _scan_cpu():
    """:mod:`salmm.model.scan_cpu`, or None when numba does not import (the reason is logged)."""
    try:
        from salmm.model import scan_cpu  # lazy: numba may be missing; the torch scan stands in
    except ImportError as exc:
        log.info("numba CPU scan unavailable (%s: %s)", type(exc).__name__, exc)
        return None
    return scan_cpu


@functools.cache
def _scan_triton():
    """:mod:`salmm.model.scan_triton`, or None when Triton does not import (logged)."""
    try:
        from salmm.model import scan_triton  # lazy: Triton is optional and slow to import
    except ImportError as exc:
        log.info("Triton scan unavailable (%s: %s)", type(exc).__name__, exc)
        return None
    return scan_triton


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``): tests only."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation :func:`selective_scan` runs for ``impl`` on ``device``:
    "numba", "triton" or "torch" (see there); raises where the one asked for cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    numba_ok = device.type == "cpu" and _scan_cpu() is not None
    triton_ok = ((device.type == "cuda" or triton_interpreted() and device.type == "cpu")
                 and _scan_triton() is not None)
    if impl == "auto":
        if device.type == "cuda":
            return "triton" if triton_ok else "torch"
        return "numba" if numba_ok else "torch"
    if impl == "numba" and not numba_ok:
        raise RuntimeError("impl='numba' needs CPU tensors and numba (see salmm.model.scan_cpu)")
    if impl == "triton" and not triton_ok:
        raise RuntimeError("impl='triton' needs CUDA tensors and Triton, or TRITON_INTERPRET=1 "
                           "(see salmm.model.scan_triton)")
    return impl


def _prepare(u, delta, delta_bias, delta_softplus):
    """Compute dtype (float32, or float64 when u is float64) and the final time step."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        dt = F.softplus(dt)
    return dtype, dt


def _finish(y, u, D, z, dtype_in):
    """y [..., d, l] -> add D * u, gate by silu(z), cast back to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_len: int | None = None,
    impl: str = "auto",
) -> Tensor:
    """Vectorised selective scan; see the module docstring for shapes (leading dims allowed).
    Differentiable in all tensor inputs. Memory: two saved [..., d, l, n] buffers (decay,
    state) in the compute dtype.

    impl: ``"numba"`` - the fused CPU kernels of :mod:`salmm.model.scan_cpu` (CPU tensors only);
    ``"triton"`` - the Triton kernels of :mod:`salmm.model.scan_triton` (CUDA tensors);
    ``"torch"`` - the chunked PyTorch scan below (any device); ``"auto"`` - numba for CPU
    tensors, Triton for CUDA tensors, torch where those do not import (:func:`resolve_impl`). chunk_len (torch
    only): time steps per chunk (default ``CHUNK_LEN``; a constant, so a sequence's output
    never depends on the batch it is computed in); the torch scan's saved buffers have l
    rounded up to a multiple of it (the padded steps have decay 1 and no drive, so they
    change no state)."""
    chosen = resolve_impl(impl, u.device)
    if chosen != "torch" and chunk_len is not None:
        raise ValueError("chunk_len applies to impl='torch' only")
    if chosen == "numba":
        return _scan_cpu().scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == "triton":
        return _scan_triton().scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype, dt = _prepare(u, delta, delta_bias, delta_softplus)
    uc = u.to(dtype)
    chunk_len = chunk_len or CHUNK_LEN
    length = u.shape[-1]
    chunks = -(-length // chunk_len)
    padded = chunks * chunk_len  # zero steps at the end (decay 1, no drive) change no state

    def interleaved(t):  # [..., l] -> [T, K, ...], element [t, k] = step k*T + t
        t = t.to(dtype)
        if padded > length:
            t = F.pad(t, (0, padded - length))
        t = t.unflatten(-1, (chunks, chunk_len))
        return t.movedim((-1, -2), (0, 1)).contiguous()

    y = _SelectiveScanCore.apply(
        interleaved(dt),
        interleaved(uc),
        A.to(dtype).contiguous(),
        interleaved(B),
        interleaved(C),
    )
    y = y.movedim((0, 1), (-1, -2)).flatten(-2)[..., :length]
    return _finish(y, uc, D, z, u.dtype)


EXPORT_GROUP = 3
"""Time steps closed at once by :func:`_grouped_scan` (groups of groups at the next level)."""
EXPORT_FLOOR = -20.0
"""Most negative log-decay :func:`_grouped_scan` takes per step: a state scaled by e^-20 (2e-9)
is below float32 resolution beside the drive it is added to, so the clamp changes nothing
visible, and a group's exponents stay within 3 x 20 = 60 (no overflow in float32)."""


def _grouped_scan(log_decay: Tensor, drive: Tensor) -> Tensor:
    """``h[t] = exp(log_decay[t]) * h[t-1] + drive[t]`` along the last axis from ``h[-1] = 0``
    (log_decay <= 0), in O(length) tensor operations and log(length) levels.

    The steps are cut into groups of :data:`EXPORT_GROUP`. Within a group, with ``c`` the
    running sum of the log-decays, ``h[t] = exp(c[t]) * cumsum(exp(-c) * drive)[t]`` plus the
    state entering the group times ``exp(c[t])``; that entering state is the same recurrence
    one level up, over the groups' total log-decays and their end states from a zero start.
    """
    length = log_decay.shape[-1]
    if length == 1:
        return drive
    pad = -length % EXPORT_GROUP
    if pad:
        log_decay, drive = F.pad(log_decay, (0, pad)), F.pad(drive, (0, pad))
    groups = (length + pad) // EXPORT_GROUP
    running = log_decay.clamp(min=EXPORT_FLOOR).unflatten(-1, (groups, EXPORT_GROUP)).cumsum(-1)
    grow = torch.exp(running)                                      # <= 1
    local = grow * torch.cumsum(drive.unflatten(-1, (groups, EXPORT_GROUP))
                                * torch.exp(-running), -1)        # zero start in each group
    ends = _grouped_scan(running[..., -1], local[..., -1])        # state at each group's end
    entering = F.pad(ends[..., :-1], (1, 0))                       # ... and at its start
    states = local + grow * entering.unsqueeze(-1)
    return states.flatten(-2)[..., :length]


def selective_scan_export(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """:func:`selective_scan` (same arguments, shapes and leading group dims) as traceable
    out-of-place operations, for export; forward only. Agrees with
    :func:`selective_scan_ref` to float rounding (the tests)."""
    dtype, dt = _prepare(u, delta, delta_bias, delta_softplus)
    uc = u.to(dtype)
    log_decay = dt.unsqueeze(-2) * A.to(dtype).unsqueeze(-1)       # [..., d, n, l]
    drive = (dt * uc).unsqueeze(-2) * B.to(dtype).unsqueeze(-3)    # [..., d, n, l]
    states = _grouped_scan(log_decay, drive)
    y = (states * C.to(dtype).unsqueeze(-3)).sum(-2)               # [..., d, l]
    return _finish(y, uc, D, z, u.dtype)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Reference: the recurrence as a plain Python loop over time (slow; for tests and bench)."""
    dtype, dt = _prepare(u, delta, delta_bias, delta_softplus)
    uc, A, B, C = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    decay = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # [b, d, l, n]
    drive = (dt * uc).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # [b, d, l, n]
    h = uc.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [b, d, n]
    ys = []
    for decay_t, drive_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(2)):
        h = decay_t * h + drive_t
        ys.append((h * c_t[:, None, :]).sum(-1))  # [b, d]
    return _finish(torch.stack(ys, dim=2), uc, D, z, u.dtype)
