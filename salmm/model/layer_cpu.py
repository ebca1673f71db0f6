"""A whole SCPMamba layer in one numba call: SalMM inference on CPU without operator overhead.

What :meth:`salmm.model.net.SCPMambaLayer.forward` computes, for CPU inference (no autograd),
as one compiled kernel instead of some 180 PyTorch operators; the module's own forward (Mamba
backend ``"builtin"``) is its ``_ref`` twin (``tests/test_layer_cpu.py``). For each frame of
the batch, on the pixel sequence in raster order (L = H * W pixels, channels innermost, the
channels-last memory the model keeps):

* the Inception: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max-pool -> 1x1, each convolution with
  its bias and a ReLU, zero padding (the max-pool ignores the border);
* per channel group i (the four branch outputs, widths w_i): s = LayerNorm(branch), then the
  bidirectional Mamba block (:mod:`salmm.model.mamba`): in_proj; per direction the causal
  depthwise conv1d + SiLU, x_proj, dt_proj, the selective scan with softplus(dt + bias),
  the D skip and the SiLU(z) gate; the two directions summed; out_proj; plus skip_scale * s;
* the groups concatenated and LayerNormed: out [L, C_out].

Arithmetic: float32 (float64 for a float64 model, which the parity tests use to tell a wrong
computation from rounding: 1e-12 there). Inside, rows are channel-major [C, L]: products and
convolutions are loops over whole pixel rows or whole flat maps (slices, never computed
indices, which numba's wraparound check keeps from vectorising; a k x k convolution's taps past
a row's ends masked), so they vectorise without reordering any sum; only the n-long sum C . h
of the scan is reassociated (``fastmath={"reassoc"}``), as in :mod:`salmm.model.scan_cpu`, and
its decay exp(delta A) is :meth:`numba_math.StateOps.decay`, in vector code
(:func:`numba_math.state_vectors`). Fused multiply-adds only where asked for
by name (:func:`numba_math.fma`: the scan's state update, the 1x1 products' chains of four),
never left to the compiler (fastmath ``"contract"``): numba's in-process compile and its
cached machine code fuse differently, so results would depend on whether this process
compiled the kernel (measured: a training run's weights differed from a resumed one's).
Results are the same on every call, in every process, and do not depend on the thread count.
The batch's frames are claimed by up to ``torch.get_num_threads()`` threads, so batch 1 runs
on one.

A layer's weights live in one flat buffer (``Packed``) in their modules' own layouts, copied
from the modules by one operator on every call (so no update can go unseen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba.extending import intrinsic, overload
from torch import Tensor

from salmm.model.numba_math import (
    LANES,
    claim,
    exp,
    fma,
    sigmoid,
    softplus,
    state_vectors,
)
from salmm.model.scan_cpu import run_jobs

__all__ = [
    "DIMS", "EPS", "GROUPS", "GROUP_PIECES", "INCEPTION_PIECES", "Packed", "affine", "column_ok",
    "conv_shift", "direction_inputs", "direction_pieces", "inception", "layer_forward",
    "mamba_pieces", "max_pool3", "normalise", "pack", "pack_pieces", "packed_for", "piece",
    "pointwise", "silu", "spatial", "sweep", "tap_range",
]


_REASSOC = {"reassoc"}
EPS = 1e-5  # nn.LayerNorm's default, which every SCPMamba LayerNorm keeps
INCEPTION_PIECES = 12  # packed pieces of the Inception (weights and biases of its six convolutions)
GROUP_PIECES = 19  # packed pieces of one group: LayerNorm, in_proj, 2 x 7 per direction, out_proj
GROUPS = 4
DIMS = 10  # c_in, c1x1, c3x3red, c3x3, c5x5red, c5x5, pool_proj, H, W, d_state


_GENERATION = [0]
"""Counts parameter and submodule registrations anywhere in the process (an assignment,
``load_state_dict(assign=True)``, a new module): a layer's packed weights are reused without
looking its tensors up again only while it stands still."""


def _registered(*_) -> None:  # a registration hook: returns None, so nothing is replaced
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_module_registration_hook(_registered)


@dataclass
class Packed:
    """Weights for the kernels in one flat buffer: ``weights`` (one dtype), refreshed on each
    call from the module's tensors (``sources``, the pieces numbered ``tensors``, whose memory
    was at ``pointers``), ``offsets`` [pieces + 1] where each piece starts, ``dims`` (the
    kernels' int64 dimensions: a layer's are :data:`DIMS`, then d_model, d_inner and dt_rank of
    each group), ``key`` (what it was made for, with the :data:`_GENERATION` it was looked up
    in). The refresh is one operator: ``torch.cat`` of ``flat`` (1-D views of the sources and
    zeros for absent pieces) into the buffer or, when the sources are not all contiguous in
    the buffer's dtype, ``torch._foreach_copy_`` from the sources into ``views`` (the buffer's
    pieces in the sources' shapes)."""

    weights: Tensor
    views: list[Tensor]
    sources: list[Tensor]
    tensors: list[int]
    offsets: np.ndarray
    dims: np.ndarray
    flat: list[Tensor] | None
    pointers: list[int]
    key: tuple


def _refresh(packed: Packed) -> Packed:
    with torch.no_grad():
        if packed.flat is not None:
            torch.cat(packed.flat, out=packed.weights)
        else:
            torch._foreach_copy_(packed.views, packed.sources)
    return packed


def packed_for(owner, key: tuple) -> Packed | None:
    """``owner``'s packed weights, refreshed, when they were made for ``key`` and nothing was
    registered since (:data:`_GENERATION`) and their tensors' memory has not moved (``.to``,
    ``.double()``); else None (make them with :func:`pack_pieces`). Skips looking up some 90
    tensors through the modules' attributes on every call."""
    packed = owner.__dict__.get("_packed")
    if (packed is None or packed.key != (_GENERATION[0], *key)
            or [p.data_ptr() for p in packed.sources] != packed.pointers):
        return None
    return _refresh(packed)


def mamba_pieces(mamba) -> list[Tensor | int]:
    """A Mamba block's 17 tensors in the kernels' order (in_proj; per direction the depthwise
    conv's weight and bias, x_proj, dt_proj's weight and bias, A_log, D; out_proj's weight and
    bias), in their own layouts; an absent out_proj bias is its size (zeros)."""
    if mamba.in_proj.bias is not None:
        raise ValueError("the fused CPU kernels support Mamba blocks without in_proj bias")
    return [mamba.in_proj.weight,
            mamba.conv1d.weight, mamba.conv1d.bias, mamba.x_proj.weight, mamba.dt_proj.weight,
            mamba.dt_proj.bias, mamba.A_log, mamba.D,
            mamba.conv1d_b.weight, mamba.conv1d_b.bias, mamba.x_proj_b.weight,
            mamba.dt_proj_b.weight, mamba.dt_proj_b.bias, mamba.A_b_log, mamba.D_b,
            mamba.out_proj.weight,
            mamba.d_model if mamba.out_proj.bias is None else mamba.out_proj.bias]


def pack_pieces(owner, pieces: list[Tensor | int], dtype: torch.dtype, dims,
                key: tuple) -> Packed:
    """``pieces`` (tensors in their own layouts; an int: the size of an absent piece, zeros) in
    one flat buffer of ``dtype``, kept on ``owner`` for ``key`` (:func:`packed_for`; made again
    when the dtype, the dims, the tensors or their memory change) and refreshed from the tensors
    on every call: an optimiser that updates weights in place without bumping their version
    counters (PyTorch's fused Adam) cannot leave the kernels with stale weights."""
    dims = np.asarray(dims, dtype=np.int64)
    sources = [p for p in pieces if isinstance(p, Tensor)]
    pointers = [p.data_ptr() for p in sources]
    packed = owner.__dict__.get("_packed")
    if (packed is None or packed.weights.dtype != dtype or not np.array_equal(packed.dims, dims)
            or len(packed.sources) != len(sources) or packed.pointers != pointers
            or any(a is not b for a, b in zip(packed.sources, sources))):
        sizes = [p.numel() if isinstance(p, Tensor) else p for p in pieces]
        offsets = np.cumsum([0] + sizes).astype(np.int64)
        with torch.inference_mode(False):  # normal tensors: refreshed in any mode
            weights = torch.zeros(int(offsets[-1]), dtype=dtype)
            views = [weights[int(a):int(b)].view(p.shape) for a, b, p in
                     zip(offsets[:-1], offsets[1:], pieces) if isinstance(p, Tensor)]
            contiguous = all(p.is_contiguous() and p.dtype == dtype for p in sources)
            flat = [p.detach().view(-1) if isinstance(p, Tensor) else torch.zeros(p, dtype=dtype)
                    for p in pieces] if contiguous else None
        packed = Packed(weights, views, sources,
                        [i for i, p in enumerate(pieces) if isinstance(p, Tensor)], offsets, dims,
                        flat, pointers, ())
        owner._packed = packed
    packed.key = (_GENERATION[0], *key)
    return _refresh(packed)


def pack(layer, dtype: torch.dtype, height: int, width: int) -> Packed:
    """``layer``'s weights in ``dtype`` for frames of ``height`` x ``width`` pixels
    (:func:`pack_pieces`): the Inception's six convolutions (weight, bias), per group its
    LayerNorm (weight, bias) and :func:`mamba_pieces`, then the last LayerNorm and
    skip_scale."""
    packed = packed_for(layer, (dtype, height, width))
    if packed is not None:
        return packed
    inc = layer.Inception
    convs = (inc.branch1.conv, inc.branch2[0].conv, inc.branch2[1].conv, inc.branch3[0].conv,
             inc.branch3[1].conv, inc.branch4[1].conv)
    pieces = [t for conv in convs for t in (conv.weight, conv.bias)]
    norms = (layer.norm1, layer.norm2, layer.norm3, layer.norm4)
    mambas = (layer.mamba1, layer.mamba2, layer.mamba3, layer.mamba4)
    for norm, mamba in zip(norms, mambas):
        pieces += [norm.weight, norm.bias, *mamba_pieces(mamba)]
    pieces += [layer.norm.weight, layer.norm.bias, layer.skip_scale]
    dims = [layer.input_dim, *(conv.out_channels for conv in convs), height, width,
            layer.mamba1.d_state]
    for mamba in mambas:
        dims += [mamba.d_model, mamba.d_inner, mamba.dt_rank]
    return pack_pieces(layer, pieces, dtype, dims, (dtype, height, width))


def layer_forward(layer, x: Tensor) -> Tensor:
    """``layer`` (an SCPMambaLayer) on x [B, C_in, H, W] (CPU, float32 or float64, any memory
    format) -> [B, C_out, H, W] in channels-last memory, x's dtype. No autograd."""
    batch, channels, height, width = x.shape
    packed = pack(layer, x.dtype, height, width)
    pixels = x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C_in]: a view for channels-last x
    out = torch.empty(batch, height, width, layer.output_dim, dtype=x.dtype)
    run_jobs(_layer_kernel, (pixels.numpy().reshape(batch, height * width, channels),
                             packed.weights.numpy(), packed.offsets, packed.dims,
                             out.numpy().reshape(batch, height * width, -1)), batch)
    return out.permute(0, 3, 1, 2)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def piece(weights, offsets, i):
    """Piece i of a flat weight buffer (``offsets`` [pieces + 1] where each starts)."""
    return weights[offsets[i]:offsets[i + 1]]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def pointwise(x, w, b, out, row, relu):
    """out[row:row + c_out] = w x + b (x [c_in, L], w [c_out, c_in]), through ReLU if asked:
    a 1x1 convolution or a Linear layer on channel-major rows. Each output starts at its bias
    and adds the inputs in order, four at a time as a chain of fused multiply-adds (one pass
    over the output row per four inputs); with 8 or more inputs two outputs share each pass,
    so the input rows are read once for both (1.3-1.7x faster with 12 or more; the same
    bits)."""
    c_out, c_in = w.shape
    paired = c_out // 2 * 2 if c_in >= 8 else 0
    for o in range(0, paired, 2):
        first, second = out[row + o], out[row + o + 1]
        first[:] = b[o]
        second[:] = b[o + 1]
        i = 0
        while i + 4 <= c_in:
            w0, w1, w2, w3 = w[o, i], w[o, i + 1], w[o, i + 2], w[o, i + 3]
            v0, v1, v2, v3 = w[o + 1, i], w[o + 1, i + 1], w[o + 1, i + 2], w[o + 1, i + 3]
            s0, s1, s2, s3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            for p in range(first.shape[0]):
                a0, a1, a2, a3 = s0[p], s1[p], s2[p], s3[p]
                first[p] = fma(w3, a3, fma(w2, a2, fma(w1, a1, fma(w0, a0, first[p]))))
                second[p] = fma(v3, a3, fma(v2, a2, fma(v1, a1, fma(v0, a0, second[p]))))
            i += 4
        while i < c_in:
            weight, other, source = w[o, i], w[o + 1, i], x[i]
            for p in range(first.shape[0]):
                first[p] = fma(weight, source[p], first[p])
                second[p] = fma(other, source[p], second[p])
            i += 1
    for o in range(paired, c_out):
        target = out[row + o]
        target[:] = b[o]
        i = 0
        while i + 4 <= c_in:
            w0, w1, w2, w3 = w[o, i], w[o, i + 1], w[o, i + 2], w[o, i + 3]
            s0, s1, s2, s3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            for p in range(target.shape[0]):
                target[p] = fma(w3, s3[p], fma(w2, s2[p], fma(w1, s1[p],
                                                              fma(w0, s0[p], target[p]))))
            i += 4
        while i < c_in:
            weight, source = w[o, i], x[i]
            for p in range(target.shape[0]):
                target[p] = fma(weight, source[p], target[p])
            i += 1
    if relu:
        for o in range(c_out):
            target = out[row + o]
            for p in range(target.shape[0]):
                target[p] = max(target[p], 0.0)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def column_ok(k, height, width):
    """[k, H*W] uint8: whether the pixel a tap at column offset kx - k // 2 reads from pixel p
    of a map is in p's row (else it lies past the left or right edge: zero padding). Made once
    per kernel call and handed to the convolutions and max-pools of every frame."""
    pad = k // 2
    ok = np.zeros((k, height * width), dtype=np.uint8)
    for kx in range(k):
        for p in range(height * width):
            column = p % width + kx - pad
            ok[kx, p] = 0 <= column < width
    return ok


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def tap_range(ky, kx, pad, height, width):
    """(first, last, shift): the output pixels [first, last) of a flat H*W map whose tap
    (ky, kx) reads inside the map's rows, and where it reads (pixel + shift); columns past the
    edges are :func:`column_ok`'s."""
    dy, dx = ky - pad, kx - pad
    shift = dy * width + dx
    first = max(max(0, -dy) * width, -shift)
    last = min(min(height, height - dy) * width, height * width - shift)
    return first, max(first, last), shift


@numba.njit(cache=True, nogil=True, error_model="numpy")
def spatial(x, w, b, height, width, ok, out, row):
    """ReLU(k x k convolution of x [c_in, H*W] by w [c_out, c_in, k, k], zero padding k // 2,
    plus b) into out[row:row + c_out]. Each tap is one loop over the whole flat map (slices,
    not computed indices, which numba's wraparound check keeps from vectorising; a row of a
    small map is too short to), the taps past a row's ends masked out (ok:
    :func:`column_ok` for k)."""
    c_out, c_in, k, _ = w.shape
    pad = k // 2
    zero = out.dtype.type(0.0)
    for o in range(c_out):
        target = out[row + o]
        target[:] = b[o]
        for i in range(c_in):
            for ky in range(k):
                for kx in range(k):
                    first, last, shift = tap_range(ky, kx, pad, height, width)
                    weight, inside = w[o, i, ky, kx], ok[kx, first:last]
                    into, source = target[first:last], x[i, first + shift:last + shift]
                    for p in range(into.shape[0]):
                        into[p] += weight * source[p] if inside[p] else zero
        for p in range(target.shape[0]):
            target[p] = max(target[p], 0.0)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def max_pool3(x, height, width, ok, out):
    """3x3 max-pool, stride 1, border ignored (NaN propagates): x, out [C, H*W]. The
    window's taps as shifted slices of the flat map (selects: the loops vectorise; ok:
    :func:`column_ok` for 3)."""
    for c in range(x.shape[0]):
        target = out[c]
        target[:] = x[c]
        for ky in range(3):
            for kx in range(3):
                first, last, shift = tap_range(ky, kx, 1, height, width)
                inside, into = ok[kx, first:last], target[first:last]
                source = x[c, first + shift:last + shift]
                for p in range(into.shape[0]):
                    v = source[p]
                    into[p] = v if inside[p] and (v > into[p] or np.isnan(v)) else into[p]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def normalise(x, row, width, mean, rstd, xhat):
    """LayerNorm without its affine part over the ``width`` channel rows of x [C, L] from
    ``row`` on, at each pixel: mean [L], rstd = 1 / sqrt(biased variance + 1e-5) [L] and
    xhat[c] = (x[row + c] - mean) * rstd [width, L]."""
    f = xhat.dtype.type
    mean[:] = 0.0
    for c in range(width):
        for p in range(mean.shape[0]):
            mean[p] += x[row + c, p]
    rstd[:] = 0.0
    for p in range(mean.shape[0]):
        mean[p] /= f(width)
    for c in range(width):
        for p in range(mean.shape[0]):
            d = x[row + c, p] - mean[p]
            rstd[p] += d * d
    for p in range(mean.shape[0]):
        rstd[p] = f(1.0) / np.sqrt(rstd[p] / f(width) + f(EPS))
    for c in range(width):
        for p in range(mean.shape[0]):
            xhat[c, p] = (x[row + c, p] - mean[p]) * rstd[p]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _layer_norm(x, row, width, g, b, mean, rstd, out):
    """out[c] = (x[row + c] - mean) * rstd * g[c] + b[c] over the ``width`` channel rows of x
    [C, L] at each pixel (:func:`normalise`; ``mean``, ``rstd`` [L] scratch)."""
    normalise(x, row, width, mean, rstd, out)
    affine(out, g, b, out)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def affine(xhat, gain, bias, out):
    """LayerNorm's affine part: out[c] = xhat[c] * gain[c] + bias[c] (rows [w, L]; out may be
    xhat)."""
    for c in range(out.shape[0]):
        for p in range(out.shape[1]):
            out[c, p] = xhat[c, p] * gain[c] + bias[c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def silu(x, out):
    """out = x * sigmoid(x), elementwise over flat arrays."""
    f = out.dtype.type
    for i in range(x.shape[0]):
        out[i] = x[i] * sigmoid(x[i], f)[0]


def _sweep_body(ops, k, scalars):
    """The forward sweep's step for one channel on one vector of states: arrays h (the state,
    updated in place), a, B, C (at the step's row); scalars dt, x = dt u; the sum: C . h."""
    _, h = ops.advance(*scalars, ops.load(1, k), ops.load(0, k), ops.load(2, k))
    ops.store(h, 0, k)
    return (ops.builder.fmul(ops.load(3, k), h),)


def _sweep_kernel(straight: bool):
    """:func:`sweep`'s kernel, its channel steps :func:`~salmm.model.numba_math.state_vectors`
    code: ``straight`` for n = :data:`~salmm.model.numba_math.LANES`, else general (one kernel
    each, as the scan's adjoint: the general case's code beside the straight one spills)."""

    @intrinsic
    def step(typingctx, h, a, b_t, c_t, rows, dt, x):
        return state_vectors(_sweep_body, 4, 1, straight, (h, a, b_t, c_t, rows, dt, x))

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def sweep_kernel(delta, u, b_t, c_t, a, y, backward, every, checkpoints):
        d_inner, length = u.shape
        h = np.zeros((d_inner, a.shape[1]), dtype=y.dtype)
        for s in range(length):
            t = length - 1 - s if backward else s
            for c in range(d_inner):
                dt = delta[c, t]
                y[c, t] = step(h, a, b_t, c_t, (c, c, t, t), dt, dt * u[c, t])[0]
            if every > 0 and (s + 1) % every == 0:
                checkpoints[s // every] = h

    return sweep_kernel


_sweep = _sweep_kernel(False)
_sweep_lanes = _sweep_kernel(True)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def sweep(delta, u, b_t, c_t, a, y, backward, every, checkpoints):
    """The selective scan's recurrence over channel-major delta, u [d_inner, L] and time-major
    B, C (b_t, c_t [L, n]; all C-contiguous): h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t
    from h = 0, y[c, t] = C_t . h_t[c] (channel-major [d_inner, L]; the n-long sum
    reassociated); time runs downwards when ``backward``. ``every`` > 0: checkpoints
    [ceil(L / every), d_inner, n] receives the state after every ``every``-th step (what
    training's backward recomputes the states from); 0: none kept. A step's scalars are read
    and written where they lie (one value per channel row: no transposed copies); a channel's
    n states are LLVM vectors (:func:`~salmm.model.numba_math.state_vectors`), updated in
    place."""
    if a.shape[1] == LANES:
        _sweep_lanes(delta, u, b_t, c_t, a, y, backward, every, checkpoints)
    else:
        _sweep(delta, u, b_t, c_t, a, y, backward, every, checkpoints)


def direction_pieces(weights, offsets, first, d_inner, rank, n):
    """One direction's tensors, from piece ``first`` on: the depthwise conv's weight
    [d_inner, taps] and bias, x_proj [rank + 2n, d_inner], dt_proj [d_inner, rank], its bias,
    A_log [d_inner, n] and D; implemented for numba only (see the overload below)."""
    raise NotImplementedError


@overload(direction_pieces, inline="always")
def _direction_pieces_overload(weights, offsets, first, d_inner, rank, n):
    def impl(weights, offsets, first, d_inner, rank, n):
        return (piece(weights, offsets, first).reshape(d_inner, -1),
                piece(weights, offsets, first + 1),
                piece(weights, offsets, first + 2).reshape(rank + 2 * n, d_inner),
                piece(weights, offsets, first + 3).reshape(d_inner, rank),
                piece(weights, offsets, first + 4),
                piece(weights, offsets, first + 5).reshape(d_inner, n),
                piece(weights, offsets, first + 6))

    return impl


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def conv_shift(direction, k, taps):
    """Where tap k of the depthwise conv reads, relative to the output step: causal for
    direction 0 (the block's conv1d, padded by taps - 1 and cut to L), anti-causal for 1 (the
    same conv on the time-flipped sequence)."""
    return k - (taps - 1) if direction == 0 else (taps - 1) - k


@numba.njit(cache=True, nogil=True, error_model="numpy")
def direction_inputs(x, conv_w, conv_b, x_proj, dt_proj, dt_bias, a_log, direction, pre, u, bc,
                     lin, delta, a):
    """One direction's scan inputs from x [d_inner, L] (in_proj's first half): pre = the
    depthwise conv (causal for direction 0, anti-causal for 1) + bias, u = SiLU(pre),
    bc = x_proj u ([dt; B; C], [rank + 2n, L]), lin = dt_proj dt + dt_bias, delta =
    softplus(lin) ([d_inner, L]; separate arrays: aliased ones stop the loops vectorising),
    and A = -exp(A_log) into a."""
    d_inner, length = x.shape
    rank, n = dt_proj.shape[1], a.shape[1]
    taps = conv_w.shape[1]
    for c in range(d_inner):
        for k in range(n):
            a[c, k] = -exp(a_log[c, k])  # A = -exp(A_log), as the block computes it
        pre[c] = conv_b[c]
        for k in range(taps):
            shift = conv_shift(direction, k, taps)
            t0, t1 = max(0, -shift), min(length, length - shift)
            if t1 <= t0:  # (a negative slice end would count from the end)
                continue
            weight = conv_w[c, k]
            into, source = pre[c, t0:t1], x[c, t0 + shift:t1 + shift]
            for t in range(into.shape[0]):
                into[t] += weight * source[t]
    silu(pre.ravel(), u.ravel())
    pointwise(u, x_proj, np.zeros(rank + 2 * n, dtype=x.dtype), bc, 0, False)
    pointwise(bc[:rank], dt_proj, np.zeros(d_inner, dtype=x.dtype), lin, 0, False)
    for c in range(d_inner):
        for t in range(length):
            lin[c, t] += dt_bias[c]
            delta[c, t] = softplus(lin[c, t])[0]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _mamba(s, weights, offsets, base, d_model, d_inner, rank, n, out, row):
    """The bidirectional Mamba block on s [d_model, L] into out[row:row + d_model]."""
    length = s.shape[1]
    dtype = out.dtype
    xz = np.empty((2 * d_inner, length), dtype=dtype)
    pointwise(s, piece(weights, offsets, base + 2).reshape(2 * d_inner, d_model),
               np.zeros(2 * d_inner, dtype=dtype), xz, 0, False)
    gate = np.empty((d_inner, length), dtype=dtype)
    silu(xz[d_inner:].ravel(), gate.ravel())
    u, pre = np.empty((d_inner, length), dtype=dtype), np.empty((d_inner, length), dtype=dtype)
    delta, lin = np.empty((d_inner, length), dtype=dtype), np.empty((d_inner, length), dtype=dtype)
    bc = np.empty((rank + 2 * n, length), dtype=dtype)
    b_t, c_t = np.empty((length, n), dtype=dtype), np.empty((length, n), dtype=dtype)
    state = np.empty((0, d_inner, n), dtype=dtype)  # (no checkpoints)
    acc = np.empty((d_inner, length), dtype=dtype)
    y = np.zeros((d_inner, length), dtype=dtype)
    a = np.empty((d_inner, n), dtype=dtype)
    for direction in range(2):
        conv_w, conv_b, x_proj, dt_proj, dt_bias, a_log, d = direction_pieces(
            weights, offsets, base + 3 + 7 * direction, d_inner, rank, n)
        direction_inputs(xz[:d_inner], conv_w, conv_b, x_proj, dt_proj, dt_bias, a_log,
                         direction, pre, u, bc, lin, delta, a)
        b_t[:] = bc[rank:rank + n].T
        c_t[:] = bc[rank + n:].T
        sweep(delta, u, b_t, c_t, a, acc, direction == 1, 0, state)
        for c in range(d_inner):
            for t in range(length):
                y[c, t] += (acc[c, t] + d[c] * u[c, t]) * gate[c, t]
    pointwise(y, piece(weights, offsets, base + 17).reshape(d_model, d_inner),
               piece(weights, offsets, base + 18), out, row, False)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def inception(planes, weights, offsets, dims, ok3, ok5, branches, reduced3, reduced5, pooled):
    """The Inception on planes [c_in, L] (a frame, channel-major) -> branches [c_out, L], the
    four branches' outputs after their ReLU; also the 1x1 reductions before the 3x3 and the
    5x5 convolution (after their ReLU) into reduced3 [c3x3red, L] and reduced5 [c5x5red, L],
    and the max-pooled planes into pooled [c_in, L]. ``dims``: see :data:`DIMS`; ok3, ok5:
    :func:`column_ok` for 3 and 5."""
    c_in, c1, c2r, c2, c3r, c3, c4, height, width = dims[:DIMS - 1]
    pointwise(planes, piece(weights, offsets, 0).reshape(c1, c_in),
              piece(weights, offsets, 1), branches, 0, True)
    pointwise(planes, piece(weights, offsets, 2).reshape(c2r, c_in),
              piece(weights, offsets, 3), reduced3, 0, True)
    spatial(reduced3, piece(weights, offsets, 4).reshape(c2, c2r, 3, 3),
            piece(weights, offsets, 5), height, width, ok3, branches, c1)
    pointwise(planes, piece(weights, offsets, 6).reshape(c3r, c_in),
              piece(weights, offsets, 7), reduced5, 0, True)
    spatial(reduced5, piece(weights, offsets, 8).reshape(c3, c3r, 5, 5),
            piece(weights, offsets, 9), height, width, ok5, branches, c1 + c2)
    max_pool3(planes, height, width, ok3, pooled)
    pointwise(pooled, piece(weights, offsets, 10).reshape(c4, c_in),
              piece(weights, offsets, 11), branches, c1 + c2 + c3, True)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _layer_kernel(x, weights, offsets, dims, out, counter):
    """Frames claimed from ``counter``: x [B, L, C_in] -> out [B, L, C_out] (module docstring);
    inside, channel-major [C, L] rows."""
    c_in, c1, c2r, c2, c3r, c3, c4, height, width, n = dims[:DIMS]
    length = x.shape[1]
    widths = (c1, c2, c3, c4)
    c_out = c1 + c2 + c3 + c4
    dtype = out.dtype
    end = INCEPTION_PIECES + GROUPS * GROUP_PIECES
    skip = piece(weights, offsets, end + 2)[0]
    planes = np.empty((c_in, length), dtype=dtype)
    branches = np.empty((c_out, length), dtype=dtype)
    reduced3, reduced5 = np.empty((c2r, length), dtype=dtype), np.empty((c3r, length), dtype=dtype)
    pooled = np.empty((c_in, length), dtype=dtype)
    mixed = np.empty((c_out, length), dtype=dtype)
    final = np.empty((c_out, length), dtype=dtype)
    mean, rstd = np.empty(length, dtype=dtype), np.empty(length, dtype=dtype)
    ok3, ok5 = column_ok(3, height, width), column_ok(5, height, width)
    frame = claim(counter)
    while frame < x.shape[0]:
        planes[:] = x[frame].T
        inception(planes, weights, offsets, dims, ok3, ok5, branches, reduced3, reduced5,
                  pooled)
        row = 0
        for g in range(GROUPS):
            d_model, d_inner, rank = dims[DIMS + 3 * g: DIMS + 3 * g + 3]
            base = INCEPTION_PIECES + g * GROUP_PIECES
            s = np.empty((d_model, length), dtype=dtype)
            _layer_norm(branches, row, d_model, piece(weights, offsets, base),
                        piece(weights, offsets, base + 1), mean, rstd, s)
            _mamba(s, weights, offsets, base, d_model, d_inner, rank, n, mixed, row)
            for c in range(d_model):
                for p in range(length):
                    mixed[row + c, p] += skip * s[c, p]
            row += widths[g]
        _layer_norm(mixed, 0, c_out, piece(weights, offsets, end),
                    piece(weights, offsets, end + 1), mean, rstd, final)
        out[frame] = final.T
        frame = claim(counter)
