"""The bidirectional Mamba block on CPU as one differentiable numba kernel pair: training speed.

What :class:`salmm.model.mamba.Mamba` computes (its module docstring has the published
numerics), forward and backward, for CPU tensors under autograd: some 40 PyTorch operators and
their backward per block become one kernel call each way. The module's own path (backend
``"builtin"``) is the ``_ref`` twin (``tests/test_mamba_cpu.py``: gradcheck in float64 and the
gradients of both paths).

Per batch row, channel-major [C, L] inside (L the sequence length):

    forward   xz = W_in s; per direction: pre = causal conv(x) + b, u = SiLU(pre),
              (dt, B, C) = W_x u, dl = W_dt dt + b_dt, delta = softplus(dl),
              h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  y = C . h + D u;
              ysum = sum of y * SiLU(z) over the directions; out = W_out ysum + b_out
    backward  the same steps in reverse: the scan's adjoint runs against the direction's time,
              lambda_t = C_t gy_t + exp(delta_{t+1} A) lambda_{t+1}, segment by segment of
              EVERY steps: the forward keeps the state after each segment only, and the
              backward recomputes a segment's states and decays from it (bit for bit, into
              buffers that stay in cache) before running the adjoint over them.

:func:`block_forward` / :func:`block_backward` are the block on one sequence (what
:mod:`salmm.model.layer_train_cpu` calls per group of a layer), saving into one flat buffer per
sequence (:func:`saved_length`), taken from :data:`salmm.model.scan_cpu.workspace`.

Every sum runs in a fixed order (the n-long sums of the scan and the weight gradients' row sums
reassociated to vectorise, as in :mod:`salmm.model.scan_cpu`); fused multiply-adds only where
asked for (:func:`salmm.model.numba_math.fma`); each row's parameter gradients go to their own
buffer and are summed over rows in row order, so results do not depend on the thread count.
float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba.extending import intrinsic
from torch import Tensor
from torch.autograd.function import once_differentiable

from salmm.model.layer_cpu import (
    Packed,
    conv_shift,
    direction_inputs,
    direction_pieces,
    mamba_pieces,
    pack_pieces,
    packed_for,
    piece,
    pointwise,
    silu,
    sweep,
)
from salmm.model.numba_math import (
    LANES,
    SOFTPLUS_THRESHOLD,
    claim,
    exp,
    sigmoid,
    state_vectors,
)
from salmm.model.scan_cpu import run_jobs, workspace

__all__ = ["accumulate_outer", "block_backward", "block_forward", "mamba_forward",
           "packed_gradients", "row_dots", "row_totals", "saved_length", "scan_backward",
           "sum_rows", "transposed_product"]

_REASSOC = {"reassoc"}
EVERY = 16  # the forward keeps every EVERY-th state; the backward recomputes the others


def mamba_forward(mamba, hidden: Tensor) -> Tensor:
    """``mamba`` (a Mamba block without in_proj bias) on hidden [b, l, d_model] (CPU, float32
    or float64), differentiable in hidden and every parameter -> [b, l, d_model]. Its weights
    packed as :func:`salmm.model.layer_cpu.mamba_pieces` orders them (the kernels' order)."""
    key = (hidden.dtype,)
    packed = packed_for(mamba, key) or pack_pieces(
        mamba, mamba_pieces(mamba), hidden.dtype,
        (mamba.d_model, mamba.d_inner, mamba.dt_rank, mamba.d_state, mamba.d_conv), key)
    return _FusedMamba.apply(packed, hidden, *packed.sources)


class _FusedMamba(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, hidden, *params):
        dtype = hidden.dtype
        batch, length, d_model = hidden.shape
        weights = packed.weights.numpy().copy()  # this call's weights, for its backward too
        x = hidden.detach().contiguous()
        saved = workspace.take((batch, saved_length(packed.dims, length)), dtype).numpy()
        out = torch.empty(batch, length, d_model, dtype=dtype)
        run_jobs(_forward_kernel, (x.numpy(), weights, packed.offsets, packed.dims, saved,
                                   out.numpy()), batch)
        ctx.saved = (weights, packed, saved)
        ctx.dtypes = [p.dtype for p in params]
        return out

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gout):
        weights, packed, saved = ctx.saved
        batch, length, d_model = gout.shape
        ghidden = torch.empty(batch, length, d_model, dtype=gout.dtype)
        partial = np.zeros((batch, weights.shape[0]), dtype=weights.dtype)
        run_jobs(_backward_kernel, (gout.detach().contiguous().to(ghidden.dtype).numpy(),
                                    weights, packed.offsets, packed.dims, saved,
                                    ghidden.numpy(), partial), batch)
        needs = ctx.needs_input_grad
        return (None, ghidden if needs[1] else None,
                *packed_gradients(packed, sum_rows(partial), ctx.dtypes, needs[2:]))


def packed_gradients(packed: Packed, total: np.ndarray, dtypes, needs) -> list[Tensor | None]:
    """The gradients of ``packed``'s sources from ``total`` (laid out as its weights), each in
    its source's shape and ``dtypes``; None where ``needs`` says it is not needed."""
    parts = torch.from_numpy(total).split(np.diff(packed.offsets).tolist())
    gradients = []
    for number, source, dtype, need in zip(packed.tensors, packed.sources, dtypes, needs):
        gradient = parts[number].view(source.shape) if need else None
        gradients.append(gradient if gradient is None or gradient.dtype == dtype
                         else gradient.to(dtype))
    return gradients


@numba.njit(cache=True, nogil=True, error_model="numpy")
def sum_rows(partial):
    """The rows of ``partial`` summed in row order."""
    total = partial[0].copy()
    for r in range(1, partial.shape[0]):
        total += partial[r]
    return total


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def accumulate_outer(g, x, into):
    """into[o, i] += sum_t g[o, t] x[i, t]: a weight's gradient from rows g [O, L], x [I, L];
    two rows of each at a time (four sums in one pass; an odd last row is paired with itself
    and its spare sums dropped)."""
    rows, columns, length = g.shape[0], x.shape[0], g.shape[1]
    zero = g.dtype.type(0.0)
    for o in range(0, rows, 2):
        o1 = min(o + 1, rows - 1)
        for i in range(0, columns, 2):
            i1 = min(i + 1, columns - 1)
            g0, g1, x0, x1 = g[o], g[o1], x[i], x[i1]
            t00, t01, t10, t11 = zero, zero, zero, zero
            for t in range(length):
                t00 += g0[t] * x0[t]
                t01 += g0[t] * x1[t]
                t10 += g1[t] * x0[t]
                t11 += g1[t] * x1[t]
            into[o, i] += t00
            if i1 != i:
                into[o, i1] += t01
            if o1 != o:
                into[o1, i] += t10
                if i1 != i:
                    into[o1, i1] += t11


@numba.njit(cache=True, nogil=True, error_model="numpy")
def transposed_product(w, g, out):
    """out = w^T g (w [O, I], g [O, L], out [I, L]): the gradient a Linear passes back."""
    pointwise(g, w.T, np.zeros(w.shape[1], dtype=out.dtype), out, 0, False)


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def row_dots(a, b, into):
    """into[r] += sum_t a[r, t] b[r, t] for every row r of a, b [R, L] (each row's sum
    reassociated to vectorise: a sum in order is a chain of dependent additions, four cycles
    each). All rows in one call: a call per row paid four atomic reference counts, as long as
    a short row's sum."""
    for r in range(a.shape[0]):
        first, second = a[r], b[r]
        total = a.dtype.type(0.0)
        for t in range(first.shape[0]):
            total += first[t] * second[t]
        into[r] += total


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def row_totals(a, into):
    """into[r] += sum_t a[r, t] for every row r of a [R, L] (reassociated, as :func:`row_dots`)."""
    for r in range(a.shape[0]):
        row = a[r]
        total = a.dtype.type(0.0)
        for t in range(row.shape[0]):
            total += row[t]
        into[r] += total


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
def _conv_backward(g, x, conv_w, direction, g_w, gx):
    """Through a direction's causal depthwise convolution (:func:`conv_shift`'s taps) on rows
    x [C, L]: gx [C, L] += its input's gradient from g = dL/d(its output), g_w [C, taps] += the
    taps' (each a reassociated sum, as :func:`row_dots`)."""
    channels, length = g.shape
    taps = conv_w.shape[1]
    for c in range(channels):
        for k in range(taps):
            shift = conv_shift(direction, k, taps)
            t0, t1 = max(0, -shift), min(length, length - shift)
            if t1 <= t0:
                continue
            weight = conv_w[c, k]
            source, into, seen = g[c, t0:t1], gx[c, t0 + shift:t1 + shift], \
                x[c, t0 + shift:t1 + shift]
            total = g.dtype.type(0.0)
            for t in range(source.shape[0]):
                into[t] += weight * source[t]
            for t in range(source.shape[0]):
                total += source[t] * seen[t]
            g_w[c, k] += total


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _silu_slope(x, out, value=None):
    """out = d SiLU / dx = sigmoid(x) (1 + x (1 - sigmoid(x))) and, unless value is None,
    value = SiLU(x) = x sigmoid(x), elementwise over flat rows (one exp for both)."""
    f = out.dtype.type
    for i in range(x.shape[0]):
        sig = sigmoid(x[i], f)[0]
        out[i] = sig * (f(1.0) + x[i] * (f(1.0) - sig))
        if value is not None:  # (a branch numba prunes when value is None)
            value[i] = x[i] * sig


def saved_length(dims, length: int) -> int:
    """How many values one sequence's forward saves for its backward (:func:`block_forward`):
    dims = (d_model, d_inner, dt_rank, d_state, d_conv), ``length`` steps."""
    d_model, d_inner, rank, n, _ = (int(v) for v in dims)
    return (length * (d_model + 13 * d_inner + 2 * rank + 8 * n)
            + 2 * -(-length // EVERY) * d_inner * n)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _carve(row, dims, length):
    """The arrays a sequence's forward saves, as views of its flat buffer ``row``
    (:func:`saved_length` values): s [d_model, L], xz [2 d_inner, L], per direction pre, u, dl,
    delta, y [2, d_inner, L], bc [2, rank + 2n, L], B and C time-major [2, 2, L, n], the state
    after every EVERY-th step [2, ceil(L / EVERY), d_inner, n], and the gated sum ysum
    [d_inner, L]."""
    d_model, d_inner, rank, n, _ = dims
    segments = -(-length // EVERY)
    sizes = (d_model * length, 2 * d_inner * length, 2 * d_inner * length,
             2 * d_inner * length, 2 * (rank + 2 * n) * length, 4 * length * n,
             2 * d_inner * length, 2 * d_inner * length, 2 * segments * d_inner * n,
             2 * d_inner * length, d_inner * length)
    at = np.zeros(len(sizes) + 1, dtype=np.int64)
    for i in range(len(sizes)):
        at[i + 1] = at[i] + sizes[i]
    return (row[at[0]:at[1]].reshape(d_model, length),
            row[at[1]:at[2]].reshape(2 * d_inner, length),
            row[at[2]:at[3]].reshape(2, d_inner, length),
            row[at[3]:at[4]].reshape(2, d_inner, length),
            row[at[4]:at[5]].reshape(2, rank + 2 * n, length),
            row[at[5]:at[6]].reshape(2, 2, length, n),
            row[at[6]:at[7]].reshape(2, d_inner, length),
            row[at[7]:at[8]].reshape(2, d_inner, length),
            row[at[8]:at[9]].reshape(2, segments, d_inner, n),
            row[at[9]:at[10]].reshape(2, d_inner, length),
            row[at[10]:at[11]].reshape(d_inner, length))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def block_forward(s, weights, offsets, dims, row, out):
    """The block on one sequence, channel-major: s [d_model, L] -> out [d_model, L]; saves
    what :func:`block_backward` needs into ``row`` (:func:`saved_length` values). The block's
    17 weight pieces are ``piece(weights, offsets, 0..16)`` (the
    :func:`salmm.model.layer_cpu.mamba_pieces` order)."""
    d_model, d_inner, rank, n, _ = dims
    length = s.shape[1]
    dtype = out.dtype
    s_t, xz, pre, u, bc, bct, dl, delta, states, y, ysum = _carve(row, dims, length)
    s_t[:] = s
    a = np.empty((d_inner, n), dtype=dtype)
    pointwise(s_t, piece(weights, offsets, 0).reshape(2 * d_inner, d_model),
              np.zeros(2 * d_inner, dtype=dtype), xz, 0, False)
    gate = np.empty((d_inner, length), dtype=dtype)
    silu(xz[d_inner:].ravel(), gate.ravel())
    ysum[:] = 0.0
    for direction in range(2):
        conv_w, conv_b, x_proj, dt_proj, dt_bias, a_log, d = direction_pieces(
            weights, offsets, 1 + 7 * direction, d_inner, rank, n)
        ud, b, lin, dd = u[direction], bc[direction], dl[direction], delta[direction]
        direction_inputs(xz[:d_inner], conv_w, conv_b, x_proj, dt_proj, dt_bias, a_log,
                         direction, pre[direction], ud, b, lin, dd, a)
        yd, b_t, c_t = y[direction], bct[direction, 0], bct[direction, 1]
        b_t[:] = b[rank:rank + n].T
        c_t[:] = b[rank + n:].T
        sweep(dd, ud, b_t, c_t, a, yd, direction == 1, EVERY, states[direction])
        for c in range(d_inner):
            for t in range(length):
                yd[c, t] += d[c] * ud[c, t]
                ysum[c, t] += yd[c, t] * gate[c, t]
    pointwise(ysum, piece(weights, offsets, 15).reshape(d_model, d_inner),
              piece(weights, offsets, 16), out, 0, False)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _forward_kernel(hidden, weights, offsets, dims, saved, out, counter):
    """Rows claimed from counter: hidden [B, L, d_model] -> out [B, L, d_model], saving into
    saved [B, saved_length]."""
    d_model, length = dims[0], hidden.shape[1]
    s = np.empty((d_model, length), dtype=out.dtype)
    product = np.empty((d_model, length), dtype=out.dtype)
    r = claim(counter)
    while r < hidden.shape[0]:
        s[:] = hidden[r].T
        block_forward(s, weights, offsets, dims, saved[r], product)
        out[r] = product.T
        r = claim(counter)


def _adjoint_body(ops, k, scalars):
    """The adjoint's per-channel loops (:func:`_scan_backward`) on one vector of states.
    Arrays (each at its row): lam, a_next, C, prev, a_now, a, B, ga, gb, gc, h; scalars: g,
    x, dt. lam = a_next lam + C g (fused), through = lam prev a_now, ga += through dt,
    gb += lam dt x, gc += g h (fused); sums: through a + lam x B, lam B."""
    b, (g, x, dt) = ops.builder, scalars
    lam = ops.fma(ops.load(1, k), ops.load(0, k), b.fmul(ops.load(2, k), ops.splat(g)))
    ops.store(lam, 0, k)
    through = b.fmul(b.fmul(lam, ops.load(3, k)), ops.load(4, k))
    b_k = ops.load(6, k)
    delta_terms = b.fadd(b.fmul(through, ops.load(5, k)), b.fmul(b.fmul(lam, ops.splat(x)), b_k))
    ops.store(ops.fma(through, ops.splat(dt), ops.load(7, k)), 7, k)
    ops.store(ops.fma(lam, ops.splat(b.fmul(dt, x)), ops.load(8, k)), 8, k)
    ops.store(ops.fma(ops.splat(g), ops.load(10, k), ops.load(9, k)), 9, k)
    return delta_terms, b.fmul(lam, b_k)


def _refresh_body(ops, k, scalars):
    """The recomputed forward's per-channel step on one vector of states
    (:meth:`~salmm.model.numba_math.StateOps.advance`, as the forward sweep made them). Arrays:
    h, dec, prev, a, B (each at its row); scalars: dt, x (= dt u)."""
    dec, h = ops.advance(*scalars, ops.load(3, k), ops.load(2, k), ops.load(4, k))
    ops.store(dec, 1, k)
    ops.store(h, 0, k)
    return ()


def _scan_backward_kernel(straight: bool):
    """The scan's adjoint kernel (:func:`_scan_backward`) whose per-channel steps are
    :func:`state_vectors` code, ``straight`` or general: one kernel each, since code for the
    other case in the same kernel, even a branch never taken, made it spill as before."""

    @intrinsic
    def refresh(typingctx, h, dec, prev, a, b_t, rows, dt, x):
        return state_vectors(_refresh_body, 5, 0, straight, (h, dec, prev, a, b_t, rows, dt, x))

    @intrinsic
    def channel(typingctx, lam, a_next, c_t, prev, a_now, a, b_t, ga, gb, gc, h, rows, g, x,
                dt):
        return state_vectors(_adjoint_body, 11, 2, straight,
                             (lam, a_next, c_t, prev, a_now, a, b_t, ga, gb, gc, h, rows, g, x,
                              dt))

    @numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_REASSOC)
    def scan_backward(gy, delta, u, b_t, c_t, a, checkpoints, backward, gdelta, gu, gb, gc, ga):
        """The adjoint of one direction's scan (see the module docstring): from gy [d_inner, L]
        (dL/dy before the D term), delta and u [d_inner, L], B, C time-major (b_t, c_t [L, n]) and
        the forward's state after every EVERY-th step (checkpoints) into gdelta, gu [d_inner, L],
        gb, gc [n, L] and ga [d_inner, n] (dL/dA, accumulated). Segment by segment against the
        direction's time: the segment's states and decays recomputed from its checkpoint as the
        forward made them (bit for bit) into buffers that stay in cache, then the adjoint over
        them. A step's scalars are read and written where they lie, its rows addressed by
        number (no views: each would cost atomic reference counts, a step's worth of work for
        a few channels); its n-vectors are summed in a step-major buffer, written into gb, gc
        when the segment ends (a step's column of 2n rows L values apart falls, at L = 1024,
        into one L1 cache set: stored step by step, the adjoint took a quarter longer)."""
        d_inner, length = u.shape
        n = a.shape[1]
        lam = np.zeros((d_inner, n), dtype=gy.dtype)
        # slot i of a segment (rows i d_inner .. (i + 1) d_inner - 1): states, the state after
        # its step i - 1 (slot 0: the one before it); decays, its step i's decay (slot EVERY:
        # the following segment's first, which the segment's last adjoint step reads; 0 past
        # the sequence's end)
        states = np.empty(((EVERY + 1) * d_inner, n), dtype=gy.dtype)
        decays = np.zeros(((EVERY + 1) * d_inner, n), dtype=gy.dtype)
        sums = np.empty((2 * EVERY, n), dtype=gy.dtype)  # rows 2i, 2i + 1: step i's gb, gc
        for segment in range(-(-length // EVERY) - 1, -1, -1):
            first, last = segment * EVERY, min((segment + 1) * EVERY, length)  # steps, forward order
            if segment > 0:
                states[:d_inner] = checkpoints[segment - 1]
            else:
                states[:d_inner] = 0.0
            for step in range(first, last):                    # the forward's states, again
                t = length - 1 - step if backward else step
                row = (step - first) * d_inner
                for c in range(d_inner):
                    dt = delta[c, t]
                    refresh(states, decays, states, a, b_t,
                            (row + d_inner + c, row + c, row + c, c, t), dt, dt * u[c, t])
            sums[:] = 0.0
            for step in range(last - 1, first - 1, -1):       # the adjoint, against time
                t = length - 1 - step if backward else step
                i = step - first
                row = i * d_inner
                for c in range(d_inner):
                    dt = delta[c, t]
                    total_delta, total_u = channel(
                        lam, decays, c_t, states, decays, a, b_t, ga, sums, sums, states,
                        (c, row + d_inner + c, t, row + c, row + c, c, t, c, 2 * i, 2 * i + 1,
                         row + d_inner + c), gy[c, t], u[c, t], dt)
                    gdelta[c, t] = total_delta
                    gu[c, t] = dt * total_u
            decays[EVERY * d_inner:] = decays[:d_inner]
            for k in range(n):
                for step in range(first, last):
                    t = length - 1 - step if backward else step
                    gb[k, t] = sums[2 * (step - first), k]
                    gc[k, t] = sums[2 * (step - first) + 1, k]

    return scan_backward


_scan_backward = _scan_backward_kernel(False)
"""The scan's adjoint for any state size n."""
_scan_backward_lanes = _scan_backward_kernel(True)
"""The scan's adjoint for n = :data:`LANES` (SalM²'s): 0.9-1.25 ns a state-step."""


@numba.njit(cache=True, nogil=True, error_model="numpy")
def scan_backward(gy, delta, u, b_t, c_t, a, checkpoints, backward, gdelta, gu, gb, gc, ga):
    """The adjoint of one direction's scan (arguments as :func:`_scan_backward_kernel`'s
    kernel): the one-vector kernel for n = :data:`LANES` states, the general one otherwise."""
    if a.shape[1] == LANES:
        _scan_backward_lanes(gy, delta, u, b_t, c_t, a, checkpoints, backward, gdelta, gu, gb,
                             gc, ga)
    else:
        _scan_backward(gy, delta, u, b_t, c_t, a, checkpoints, backward, gdelta, gu, gb, gc, ga)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def block_backward(g_t, weights, offsets, dims, row, grads, gs):
    """The block's backward on one sequence: g_t = dL/dout [d_model, L] and what
    :func:`block_forward` saved in ``row`` -> gs = dL/ds [d_model, L]; each weight's gradient
    added into ``grads`` (a flat buffer laid out as ``weights``: ``piece(grads, offsets, i)``)."""
    d_model, d_inner, rank, n, taps = dims
    length = g_t.shape[1]
    dtype = gs.dtype
    s_t, xz, pre, u, bc, bct, dl, delta, states, y, ysum = _carve(row, dims, length)
    a = np.empty((d_inner, n), dtype=dtype)
    gate, gate_slope = np.empty((d_inner, length), dtype=dtype), np.empty((d_inner, length), dtype=dtype)
    slope = np.empty((d_inner, length), dtype=dtype)
    one, threshold = dtype.type(1.0), dtype.type(SOFTPLUS_THRESHOLD)
    out_w = piece(weights, offsets, 15).reshape(d_model, d_inner)
    accumulate_outer(g_t, ysum, piece(grads, offsets, 15).reshape(d_model, d_inner))
    row_totals(g_t, piece(grads, offsets, 16))
    gys = np.empty((d_inner, length), dtype=dtype)
    transposed_product(out_w, g_t, gys)
    z_all = xz[d_inner:]
    _silu_slope(z_all.ravel(), gate_slope.ravel(), gate.ravel())
    gxz = np.zeros((2 * d_inner, length), dtype=dtype)
    gy = np.empty((d_inner, length), dtype=dtype)
    gdelta = np.empty((d_inner, length), dtype=dtype)
    gu = np.empty((d_inner, length), dtype=dtype)
    gbc = np.empty((rank + 2 * n, length), dtype=dtype)
    gback = np.empty((d_inner, length), dtype=dtype)
    ga = np.empty((d_inner, n), dtype=dtype)
    for direction in range(2):
        i = 1 + 7 * direction
        conv_w, _, x_proj, dt_proj, _, a_log, d = direction_pieces(
            weights, offsets, i, d_inner, rank, n)
        for c in range(d_inner):
            for k in range(n):
                a[c, k] = -exp(a_log[c, k])
        ud, b, lin, dd, yd = u[direction], bc[direction], dl[direction], delta[direction], \
            y[direction]
        g_d = piece(grads, offsets, i + 6)
        for c in range(d_inner):          # through ysum += y * SiLU(z); rows, two loops:
            g_row, ys_row, gate_row = gy[c], gys[c], gate[c]  # they vectorise
            y_row, slope_row, into = yd[c], gate_slope[c], gxz[d_inner + c]
            for t in range(length):
                g_row[t] = ys_row[t] * gate_row[t]
            for t in range(length):
                into[t] += ys_row[t] * y_row[t] * slope_row[t]
        row_dots(gy, ud, g_d)
        ga[:] = 0.0
        scan_backward(gy, dd, ud, bct[direction, 0], bct[direction, 1], a, states[direction],
                      direction == 1, gdelta, gu, gbc[rank:rank + n], gbc[rank + n:], ga)
        g_alog = piece(grads, offsets, i + 5).reshape(d_inner, n)
        for c in range(d_inner):
            for k in range(n):
                g_alog[c, k] += ga[c, k] * a[c, k]               # dA / dA_log = A
            for t in range(length):
                gu[c, t] += d[c] * gy[c, t]
                x = lin[c, t]                 # through softplus (a select: it vectorises)
                slope_t = sigmoid(x, dtype.type)[0]
                gdelta[c, t] *= one if x > threshold else slope_t
        row_totals(gdelta, piece(grads, offsets, i + 4))
        accumulate_outer(gdelta, b[:rank], piece(grads, offsets, i + 3).reshape(d_inner, rank))
        transposed_product(dt_proj, gdelta, gbc[:rank])
        accumulate_outer(gbc, ud, piece(grads, offsets, i + 2).reshape(rank + 2 * n, d_inner))
        transposed_product(x_proj, gbc, gback)
        p = pre[direction]
        _silu_slope(p.ravel(), slope.ravel())  # (SiLU(pre) is u, saved)
        for c in range(d_inner):           # through u = SiLU(pre)
            for t in range(length):
                gback[c, t] = (gu[c, t] + gback[c, t]) * slope[c, t]
        row_totals(gback, piece(grads, offsets, i + 1))  # through the depthwise conv
        _conv_backward(gback, xz[:d_inner], conv_w, direction,
                       piece(grads, offsets, i).reshape(d_inner, taps), gxz[:d_inner])
    accumulate_outer(gxz, s_t, piece(grads, offsets, 0).reshape(2 * d_inner, d_model))
    transposed_product(piece(weights, offsets, 0).reshape(2 * d_inner, d_model), gxz, gs)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _backward_kernel(gout, weights, offsets, dims, saved, ghidden, partial, counter):
    """Rows claimed from counter: gout [B, L, d_model] -> ghidden [B, L, d_model], each row's
    weight gradients into partial[r]."""
    d_model, length = dims[0], gout.shape[1]
    g_t = np.empty((d_model, length), dtype=ghidden.dtype)
    gs = np.empty((d_model, length), dtype=ghidden.dtype)
    r = claim(counter)
    while r < gout.shape[0]:
        g_t[:] = gout[r].T
        block_backward(g_t, weights, offsets, dims, saved[r], partial[r], gs)
        ghidden[r] = gs.T
        r = claim(counter)
