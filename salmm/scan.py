"""Selective scan (the S6 recurrence of Mamba) in plain PyTorch.

Two implementations with the argument conventions of ``mamba_ssm.selective_scan_fn``:

* :func:`selective_scan` - vectorised: no Python loop over time steps.  The linear recurrence
  ``h_t = a_t * h_{t-1} + b_t`` is solved by an in-place odd/even (cyclic) reduction, log2(T)
  levels of shrinking strided views over cache-sized chunks of T steps (a loop over chunks),
  inside one autograd Function whose backward is the same reduction run in reverse.  Only
  products of decays in (0, 1] are ever formed, so it is as stable as the sequential loop
  (no division by cumulative decays, no exp overflow).
* :func:`selective_scan_ref` - the plain sequential loop, kept beside it as the reference.

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

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_LEN", "selective_scan", "selective_scan_ref"]


def _scan_(x: Tensor, c: Tensor) -> None:
    """In place, along dim 0: ``x[t+1] += c[t] * x[t]`` for t = 0 .. L-2, in sequence.

    x: [L, ...]; c: [L-1, ...] (the decay linking step t to t+1). Views of x are updated in
    place; each level allocates one pairwise decay product of half the previous length.
    """
    length = x.shape[0]
    if length == 1:
        return
    half = length // 2
    odd, even = x[1::2], x[0::2]
    odd.addcmul_(c[0::2][:half], even[:half])  # fold each pair (2k, 2k+1) into 2k+1
    # odd positions now form a sequence of `half` steps linked by c[2k+1] * c[2k+2]
    _scan_(odd, c[1::2][: half - 1] * c[2::2][: half - 1])
    rest = even[1:]  # even positions 2k >= 2 receive the finished value at 2k-1
    rest.addcmul_(c[1::2][: rest.shape[0]], odd[: rest.shape[0]])


def _rscan_(x: Tensor, c: Tensor) -> None:
    """In place, along dim 0: ``x[t] += c[t] * x[t+1]`` for t = L-2 .. 0, in sequence."""
    length = x.shape[0]
    if length == 1:
        return
    half = length // 2
    odd, even = x[1::2], x[0::2]
    even[:half].addcmul_(c[0::2][:half], odd)  # fold each pair (2k, 2k+1) into 2k
    n_even = even.shape[0]
    _rscan_(even, c[0::2][: n_even - 1] * c[1::2][: n_even - 1])
    head = odd[: n_even - 1]  # odd positions 2k+1 < L-1 receive the finished value at 2k+2
    head.addcmul_(c[1::2][: head.shape[0]], even[1:])


CHUNK_LEN = 256  # time steps per chunk: [256, b*d*n] blocks stay cache-sized at the model's shapes


class _SelectiveScanCore(torch.autograd.Function):
    """y[l, b, d] = sum_n C * h with h the recurrence above (no D, no gate, dt already final).

    Time-major layout, so every time step is one contiguous block of b*d*n values. Time is
    processed in chunks of ``chunk_len`` steps (a Python loop over chunks, not over steps):
    each chunk's state enters the next through its first step before the in-chunk reduction,
    so the working set stays cache-sized while the full decay and state tensors are written
    once and saved for the backward pass.
    """

    @staticmethod
    def forward(ctx, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_len: int):
        # dt, u: [l, *batch, d]; A: [..., d, n] broadcast over batch; B, C: [l, *batch, n]
        length, dim, n = dt.shape[0], dt.shape[-1], A.shape[-1]
        decay = dt.new_empty(*dt.shape, n)  # [l, *batch, d, n] = exp(dt * A)
        h = dt.new_empty(*dt.shape, n)  # the state h_t
        y = torch.empty_like(dt)
        dtu = dt * u  # [l, *batch, d]
        for s in range(0, length, chunk_len):
            e = min(s + chunk_len, length)
            dc = torch.mul(A, dt[s:e].unsqueeze(-1), out=decay[s:e]).exp_()
            hc = torch.mul(dtu[s:e].unsqueeze(-1), B[s:e].unsqueeze(-2), out=h[s:e])
            if s:
                hc[0].addcmul_(dc[0], h[s - 1])  # carry the previous chunk's last state in
            _scan_(hc, dc[1:])
            torch.bmm(hc.view(-1, dim, n), C[s:e].view(-1, n, 1), out=y[s:e].view(-1, dim, 1))
        ctx.save_for_backward(dt, u, A, B, C, decay, h, dtu)
        ctx.chunk_len = chunk_len
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        dt, u, A, B, C, decay, h, dtu = ctx.saved_tensors
        length, dim, n, chunk_len = dt.shape[0], dt.shape[-1], A.shape[-1], ctx.chunk_len
        gy = gy.contiguous()
        gC, gB = torch.empty_like(C), torch.empty_like(B)
        gdtu, gdt = torch.empty_like(dt), torch.zeros_like(dt)
        gA = torch.zeros_like(A)
        g_buf = dt.new_empty(min(chunk_len, length), *dt.shape[1:], n)
        tmp_buf = torch.empty_like(g_buf)
        g_after = None  # dL/dh at the first step of the chunk after this one
        for s in reversed(range(0, length, chunk_len)):
            e = min(s + chunk_len, length)
            # g = dL/dh_t: through y_t, then through every later step (reverse recurrence)
            g = torch.mul(gy[s:e].unsqueeze(-1), C[s:e].unsqueeze(-2), out=g_buf[: e - s])
            if g_after is not None:
                g[-1].addcmul_(decay[e], g_after)
            _rscan_(g, decay[s + 1 : e])
            g_after = g[0].clone()
            # read-out and input gradients: sums over d of [.., d, n] products, and g . B over n
            tmp = torch.mul(h[s:e], gy[s:e].unsqueeze(-1), out=tmp_buf[: e - s])
            torch.sum(tmp, -2, out=gC[s:e])
            torch.sum(torch.mul(g, dtu[s:e].unsqueeze(-1), out=tmp), -2, out=gB[s:e])
            torch.bmm(g.view(-1, dim, n), B[s:e].view(-1, n, 1), out=gdtu[s:e].view(-1, dim, 1))
            # dL/d(dt_t A) = g_t h_{t-1} decay_t for t >= 1 (h_{-1} = 0), built in g's buffer
            t0 = max(s, 1)
            w = g[t0 - s :].mul_(h[t0 - 1 : e - 1]).mul_(decay[t0:e])
            gA += torch.mul(w, dt[t0:e].unsqueeze(-1), out=tmp_buf[: e - t0]).sum_to_size(A.shape)
            torch.sum(w.mul_(A), -1, out=gdt[t0:e])
        gdt.addcmul_(gdtu, u)
        gu = gdtu * dt
        return gdt, gu, gA, gB, gC, None


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
) -> Tensor:
    """Vectorised selective scan; see the module docstring for shapes (leading dims allowed).
    Differentiable in all tensor inputs. Memory: two saved [..., d, l, n] buffers (decay,
    state) in the compute dtype. chunk_len: time steps per chunk (default ``CHUNK_LEN``; a
    constant, so a sequence's output never depends on the batch it is computed in)."""
    dtype, dt = _prepare(u, delta, delta_bias, delta_softplus)
    uc = u.to(dtype)
    chunk_len = chunk_len or CHUNK_LEN

    def time_major(t):  # [..., l] -> [l, ...]
        return t.to(dtype).movedim(-1, 0).contiguous()

    y = _SelectiveScanCore.apply(
        time_major(dt),
        time_major(uc),
        A.to(dtype).contiguous(),
        time_major(B),
        time_major(C),
        chunk_len,
    ).movedim(0, -1)
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
