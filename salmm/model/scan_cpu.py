"""Fused CPU selective scan: numba kernels for the whole of ``selective_scan`` on CPU.

What :func:`salmm.model.scan.selective_scan` runs for CPU tensors (argument conventions and the
recurrence: salmm/scan.py). The PyTorch chunked scan there makes some twenty passes over
state-sized [..., d, l, n] tensors plus a dozen elementwise ops around them; here the work is

* ``_prepare_kernel``: dt = softplus(delta + delta_bias) and its derivative, and time-major
  copies of dt, u, B and C;
* torch: the decays exp(dt A) = exp2(dt A log2(e)), one broadcast multiply and one exp2
  over [R, l, d, n] (torch runs them on its own threads; an exp inside the sweeps would
  cost more than both);
* ``_forward_kernel``: one sweep over time that updates the state, stores it and reduces it
  against C, then the D skip and the SiLU(z) gate;
* ``_backward_kernel``: the gate's backward, one reverse sweep that runs the adjoint
  recurrence and accumulates every gradient on the way, and softplus' backward. Torch only
  sums the per-row partials of gA, gD and g(delta_bias) over the batch.

Layout inside (R rows = batch x groups, g groups, d channels, l length, n state size), all
C-contiguous in one compute dtype (float32, or float64 for float64 input), handed to numba
as zero-copy numpy views::

    u, delta, z, y, out:  [R, d, l]   the caller's layout; row r uses group r % g
    A: [g, d, n];  D, delta_bias: [g, d]
    B, C:                 [R, n, l]
    copies of dt, u:      [R, l, d]   time-major
    copies of B, C, gB, gC: [R, l, n]
    decay, state:         [R, l, d, n]   time-major: one step of all channels is one
                                         contiguous block; saved for the backward pass,
                                         in buffers reused across calls (``Workspace``)

Time-major blocks make consecutive channels independent work (the sequential dependence of
the recurrence is one block away), and no sweep walks the [d, l] rows across channels at a
fixed step (with l a power of two those addresses share one cache set). The sweeps
vectorise over n; they are the only code compiled with ``fastmath={"reassoc"}``, so that
the n-long sums of one (step, channel) vectorise. Everything else is IEEE arithmetic as
written, the exp behind softplus and SiLU is :func:`salmm.model.numba_math.exp` (a vectorisable polynomial within
2 ulp of the exact value), and every sum runs in a fixed order: results are deterministic
and do not depend on the thread count.

The kernels release the GIL and run on up to ``torch.get_num_threads()`` threads (the
calling one and pool workers), which claim rows - (row, block of channels) in the forward
kernel when there are fewer rows than threads - from a shared atomic counter, so a thread
that starts late or shares its core with another process's work simply takes fewer.
Numba compiles each kernel once per dtype and caches the machine code in __pycache__.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

from salmm.model.numba_math import LOG2_E
from salmm.model.numba_math import claim as _claim
from salmm.model.numba_math import prefetch as _prefetch
from salmm.model.numba_math import sigmoid as _sigmoid
from salmm.model.numba_math import softplus as _softplus

__all__ = ["Workspace", "run_jobs", "scan", "workspace"]

_PREFETCH_STEPS = 4  # the backward sweep asks for decay and state this many steps ahead
_REASSOC = {"reassoc"}  # vectorised n-long sums in the sweeps; no other rewrite
_WORKSPACE_BUDGET = 256 << 20  # bytes of unused decay / state buffers kept for reuse
_pool: ThreadPoolExecutor | None = None
_pool_owner = (0, 0)  # (pid, workers) of _pool: a forked child makes its own


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _softplus_row(delta, bias, dt, dsp):
    """dt = softplus(delta + bias) as torch computes it, dsp = its derivative; rows [l]."""
    for t in range(delta.shape[0]):
        dt[t], dsp[t] = _softplus(delta[t] + bias)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gate_row(y, z, out):
    """out = y * silu(z); rows [l]."""
    f = out.dtype.type
    for t in range(y.shape[0]):
        out[t] = y[t] * (z[t] * _sigmoid(z[t], f)[0])


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gate_backward_row(gout, y, z, gy, gz):
    """Through out = y * silu(z): gy = gout * silu(z), gz = gout * y * silu'(z); rows [l]."""
    f = gy.dtype.type
    for t in range(y.shape[0]):
        sig = _sigmoid(z[t], f)[0]
        gy[t] = gout[t] * (z[t] * sig)
        gz[t] = gout[t] * y[t] * (sig * (f(1.0) + z[t] * (f(1.0) - sig)))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _prepare_kernel(delta, bias, softplus, u, B, C, dt_t, dsp, u_t, b_t, c_t, counter):
    """Per row (claimed from counter): dt = delta + bias, through softplus when asked (dsp:
    d dt / d delta), stored time-major as dt_t, with time-major copies u_t, b_t, c_t."""
    rows, dim, length = delta.shape
    n, groups = B.shape[1], bias.shape[0]
    row = np.empty(length, dtype=dt_t.dtype)
    r = _claim(counter)
    while r < rows:
        for i in range(dim):
            if softplus:
                _softplus_row(delta[r, i], bias[r % groups, i], row, dsp[r, i])
            else:
                for t in range(length):
                    row[t] = delta[r, i, t] + bias[r % groups, i]
                    dsp[r, i, t] = 1.0
            for t in range(length):
                dt_t[r, t, i] = row[t]
                u_t[r, t, i] = u[r, i, t]
        for k in range(n):
            for t in range(length):
                b_t[r, t, k] = B[r, k, t]
                c_t[r, t, k] = C[r, k, t]
        r = _claim(counter)


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _forward_sweep(dec, h, dt_r, u_r, b_r, c_r, y_t, i0, i1):
    """One row, channels i0..i1-1 (time-major [l, d, n] / [l, d] / [l, n] views):
    h[t, i] = dec[t, i] h[t-1, i] + dt u b[t] from a zero start, y_t[t, i - i0] = c[t] . h[t, i]."""
    length, n = dec.shape[0], dec.shape[2]
    zero = dec.dtype.type(0)
    for i in range(i0, i1):
        x = dt_r[0, i] * u_r[0, i]
        acc = zero
        for k in range(n):
            v = x * b_r[0, k]
            h[0, i, k] = v
            acc += c_r[0, k] * v
        y_t[0, i - i0] = acc
    for t in range(1, length):
        for i in range(i0, i1):
            x = dt_r[t, i] * u_r[t, i]
            acc = zero
            for k in range(n):
                v = dec[t, i, k] * h[t - 1, i, k] + x * b_r[t, k]
                h[t, i, k] = v
                acc += c_r[t, k] * v
            y_t[t, i - i0] = acc


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _forward_kernel(decay, dt_t, u_t, b_t, c_t, u, D, z, gated, state, y, out, blocks, counter):
    """Per (row, block of channels) - each row's channels cut into ``blocks`` - claimed from
    counter: the forward sweep into state, y = its output + D u, out = y * silu(z) when
    gated (else out is y)."""
    rows, length, dim, _ = decay.shape
    groups = D.shape[0]
    y_t = np.empty((length, -(-dim // blocks)), dtype=decay.dtype)
    job = _claim(counter)
    while job < rows * blocks:
        r, block = job // blocks, job % blocks
        i0, i1 = block * dim // blocks, (block + 1) * dim // blocks
        _forward_sweep(decay[r], state[r], dt_t[r], u_t[r], b_t[r], c_t[r], y_t, i0, i1)
        for i in range(i0, i1):
            skip = D[r % groups, i]
            for t in range(length):
                y[r, i, t] = y_t[t, i - i0] + skip * u[r, i, t]
            if gated:
                _gate_row(y[r, i], z[r, i], out[r, i])
        job = _claim(counter)


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _backward_sweep(dec, h, dt_r, u_r, b_r, c_r, a_r, gy_t, g, ga, gb_r, gc_r, gdt_t, gu_t):
    """One row (time-major views as in the forward sweep, gy_t = dL/dy [l, d]): the adjoint
    g_t = dL/dh_t = gy_t c_t + dec_{t+1} g_{t+1} from t = l-1 down to 0, accumulating
    gb_r, gc_r [l, n] (over channels) and ga [d, n], writing gdt_t, gu_t [l, d]."""
    length, dim, n = dec.shape
    zero = dec.dtype.type(0)
    ga[:] = zero
    gb_r[:] = zero
    gc_r[:] = zero
    g[:] = zero
    for t in range(length - 1, 0, -1):
        ahead = max(t - _PREFETCH_STEPS, 0) * dim * n
        for i in range(dim):
            for j in (ahead + i * n, ahead + i * n + n - 1):  # first and last of a row
                _prefetch(dec, j)
                _prefetch(h, j)
            gy_ti, dt_ti = gy_t[t, i], dt_r[t, i]
            dtu = dt_ti * u_r[t, i]
            gdtu = zero
            gdec = zero
            for k in range(n):
                gk = g[i, k] + gy_ti * c_r[t, k]
                gc_r[t, k] += gy_ti * h[t, i, k]
                gb_r[t, k] += gk * dtu
                gdtu += gk * b_r[t, k]
                w = gk * dec[t, i, k] * h[t - 1, i, k]  # dL/d(dt_t A)
                ga[i, k] += w * dt_ti
                gdec += w * a_r[i, k]
                g[i, k] = gk * dec[t, i, k]
            gdt_t[t, i] = gdec + gdtu * u_r[t, i]
            gu_t[t, i] = gdtu * dt_ti
    for i in range(dim):  # t = 0: h_{-1} = 0, no decay term
        gy_ti, dt_ti = gy_t[0, i], dt_r[0, i]
        dtu = dt_ti * u_r[0, i]
        gdtu = zero
        for k in range(n):
            gk = g[i, k] + gy_ti * c_r[0, k]
            gc_r[0, k] += gy_ti * h[0, i, k]
            gb_r[0, k] += gk * dtu
            gdtu += gk * b_r[0, k]
        gdt_t[0, i] = gdtu * u_r[0, i]
        gu_t[0, i] = gdtu * dt_ti


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _backward_kernel(
    decay,
    state,
    dt_t,
    dsp,
    u_t,
    b_t,
    c_t,
    A,
    D,
    z,
    gated,
    y,
    gout,
    gdelta,
    gu,
    gA,
    gb_t,
    gc_t,
    gz,
    gy,
    counter,
):
    """Per row (claimed from counter): through the gate (gy = dL/dy, gz), the backward sweep
    (gA [R, d, n]: one partial per row; gb_t, gc_t time-major), then gdelta = gdt * dsp and
    gu with the D u path. gy is kept for the caller's gD."""
    rows, length, dim, n = decay.shape
    groups = A.shape[0]
    dtype = decay.dtype
    g = np.empty((dim, n), dtype=dtype)
    gy_t, gdt_t = np.empty((length, dim), dtype=dtype), np.empty((length, dim), dtype=dtype)
    gu_t = np.empty((length, dim), dtype=dtype)
    r = _claim(counter)
    while r < rows:
        for i in range(dim):
            if gated:
                _gate_backward_row(gout[r, i], y[r, i], z[r, i], gy[r, i], gz[r, i])
            else:
                for t in range(length):
                    gy[r, i, t] = gout[r, i, t]
            for t in range(length):
                gy_t[t, i] = gy[r, i, t]
        _backward_sweep(
            decay[r],
            state[r],
            dt_t[r],
            u_t[r],
            b_t[r],
            c_t[r],
            A[r % groups],
            gy_t,
            g,
            gA[r],
            gb_t[r],
            gc_t[r],
            gdt_t,
            gu_t,
        )
        for i in range(dim):
            skip = D[r % groups, i]
            for t in range(length):
                gdelta[r, i, t] = gdt_t[t, i] * dsp[r, i, t]
                gu[r, i, t] = gu_t[t, i] + gy[r, i, t] * skip
        r = _claim(counter)


def run_jobs(kernel, args: tuple, jobs: int) -> None:
    """``kernel(*args, counter)`` on up to ``torch.get_num_threads()`` threads (this one and
    pool workers; the kernels release the GIL), all claiming jobs from the shared counter
    until ``jobs`` are taken."""
    global _pool, _pool_owner
    counter = np.zeros(1, dtype=np.int64)
    helpers = min(torch.get_num_threads(), jobs) - 1
    if helpers > 0 and (_pool_owner[0] != os.getpid() or _pool_owner[1] < helpers):
        _pool = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="scan_cpu")
        _pool_owner = (os.getpid(), helpers)
    futures = [_pool.submit(kernel, *args, counter) for _ in range(helpers)]
    kernel(*args, counter)
    for future in futures:
        if not future.cancel():  # a worker that never started has nothing left to do
            future.result()


class Workspace:
    """Reusable buffers for the saved decay and state tensors.

    PyTorch does not cache CPU memory, so each fresh multi-MB buffer costs one page fault per
    4 KiB page on first touch - as long as a sweep over it. Buffers here are numpy arrays
    handed out as tensors (``torch.from_numpy``, whose storage holds a reference to the
    array); an array is handed out again only once no tensor refers to it any more (its
    reference count is back to the list's own). Unused arrays beyond ``budget`` bytes are
    dropped, least recently used first.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.arrays: list[np.ndarray] = []  # least recently used first
        self.lock = threading.Lock()

    def _unused(self, i: int) -> bool:
        return sys.getrefcount(self.arrays[i]) == 2  # the list's reference and the argument

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` (float32 / float64)."""
        np_dtype = np.dtype(np.float64 if dtype == torch.float64 else np.float32)
        with self.lock:
            for i in range(len(self.arrays)):
                if (
                    self.arrays[i].shape == shape
                    and self.arrays[i].dtype == np_dtype
                    and self._unused(i)
                ):
                    self.arrays.append(self.arrays.pop(i))
                    break
            else:
                self.arrays.append(np.empty(shape, np_dtype))
            spare = sum(
                self.arrays[i].nbytes for i in range(len(self.arrays) - 1) if self._unused(i)
            )
            i = 0
            while spare > self.budget and i < len(self.arrays) - 1:
                if self._unused(i):
                    spare -= self.arrays.pop(i).nbytes
                else:
                    i += 1
            return torch.from_numpy(self.arrays[-1])


workspace = Workspace(_WORKSPACE_BUDGET)


def _numpy(*tensors: Tensor) -> tuple[np.ndarray, ...]:
    """Zero-copy numpy views of contiguous CPU tensors."""
    return tuple(t.numpy() for t in tensors)


class _FusedScan(torch.autograd.Function):
    """out [R, d, l] from u, delta, z [R, d, l]; A [g, d, n]; B, C [R, n, l]; D, delta_bias
    [g, d] (z may be None: no gate); all contiguous, one compute dtype."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool) -> Tensor:
        rows, dim, length = u.shape
        groups, n = A.shape[0], A.shape[-1]
        dt_t, u_t = u.new_empty(rows, length, dim), u.new_empty(rows, length, dim)
        b_t, c_t = u.new_empty(rows, length, n), u.new_empty(rows, length, n)
        dsp = torch.empty_like(u)
        args = _numpy(delta, delta_bias) + (softplus,) + _numpy(u, B, C, dt_t, dsp, u_t, b_t, c_t)
        run_jobs(_prepare_kernel, args, rows)

        decay = workspace.take((rows, length, dim, n), u.dtype)
        torch.mul(
            dt_t.view(-1, groups, length, dim, 1),
            (A * LOG2_E).unsqueeze(-3),
            out=decay.view(-1, groups, length, dim, n),
        ).exp2_()
        state = workspace.take((rows, length, dim, n), u.dtype)
        y = torch.empty_like(u)
        gated = z is not None
        out = torch.empty_like(u) if gated else y
        z_or_y = z if gated else y  # a placeholder the kernels do not read
        # fewer rows than threads: cut each row's channels into blocks, one per thread
        blocks = max(1, min(torch.get_num_threads() // rows, dim))
        args = _numpy(decay, dt_t, u_t, b_t, c_t, u, D, z_or_y) + (gated,)
        run_jobs(_forward_kernel, args + _numpy(state, y, out) + (blocks,), rows * blocks)
        ctx.gated = gated
        ctx.save_for_backward(decay, state, dt_t, dsp, u_t, b_t, c_t, A, D, z_or_y, y, u)
        return out

    @staticmethod
    def backward(ctx, gout: Tensor):
        decay, state, dt_t, dsp, u_t, b_t, c_t, A, D, z_or_y, y, u = ctx.saved_tensors
        rows, dim, _ = u.shape
        groups, n = A.shape[0], A.shape[-1]
        gdelta, gu, gy = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
        gz = torch.empty_like(u) if ctx.gated else None
        gb_t, gc_t = torch.empty_like(b_t), torch.empty_like(c_t)
        gA_rows = A.new_empty(rows, dim, n)
        args = _numpy(decay, state, dt_t, dsp, u_t, b_t, c_t, A, D, z_or_y) + (ctx.gated,)
        outputs = (gdelta, gu, gA_rows, gb_t, gc_t, gz if ctx.gated else gy, gy)
        run_jobs(_backward_kernel, args + _numpy(y, gout.contiguous(), *outputs), rows)

        def over_batch(t):  # [R, ...] per-row partials -> [g, ...] sums
            return t.view(-1, groups, *t.shape[1:]).sum(0)

        needs = ctx.needs_input_grad
        gA = over_batch(gA_rows)
        gD = over_batch((gy * u).sum(-1)) if needs[5] else None
        gbias = over_batch(gdelta.sum(-1)) if needs[7] else None
        # gB, gC as transposed views of the time-major buffers: a caller that made B, C
        # by transposing time-major tensors (as the Mamba block does) gets them copy-free
        gB, gC = gb_t.transpose(1, 2), gc_t.transpose(1, 2)
        return gu, gdelta, gA, gB, gC, gD, gz, gbias, None


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool) -> Tensor:
    """``selective_scan`` on CPU tensors: same arguments and shapes (leading group dims
    included, D / z / delta_bias may be None), float32 compute (float64 for float64 u);
    returns [b, *G, d, l] in u's dtype. Differentiable in all tensor inputs."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, groups_shape, (dim, length) = u.shape[0], u.shape[1:-2], u.shape[-2:]
    n = A.shape[-1]
    groups = math.prod(groups_shape)

    def as_rows(t, *shape):  # cast, broadcast to shape, flatten all but the last two dims
        t = t.to(dtype)
        if t.shape != shape:
            t = t.expand(shape)
        if t.ndim != 3:
            t = t.reshape(-1, *shape[-2:])
        return t.contiguous()

    def per_group(t):  # D, delta_bias [*G, d] (or None: zeros) -> [g, d]
        if t is None:
            return u.new_zeros(groups, dim, dtype=dtype)
        t = t.to(dtype)
        if t.shape != (*groups_shape, dim):
            t = t.expand(*groups_shape, dim)
        return t.reshape(groups, dim).contiguous()

    out = _FusedScan.apply(
        as_rows(u, batch, *groups_shape, dim, length),
        as_rows(delta, batch, *groups_shape, dim, length),
        as_rows(A, *groups_shape, dim, n),
        as_rows(B, batch, *groups_shape, n, length),
        as_rows(C, batch, *groups_shape, n, length),
        per_group(D),
        None if z is None else as_rows(z, batch, *groups_shape, dim, length),
        per_group(delta_bias),
        delta_softplus,
    )
    return out.view(u.shape).to(u.dtype)
