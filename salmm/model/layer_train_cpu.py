"""A whole SCPMamba layer for training on CPU as one differentiable numba kernel pair.

What :meth:`salmm.model.net.SCPMambaLayer.forward` computes, forward and backward, for CPU
tensors under autograd: the Inception (:func:`salmm.model.layer_cpu.inception`: 1x1; 1x1 ->
3x3; 1x1 -> 5x5; 3x3 max-pool -> 1x1, each convolution with its bias and a ReLU), then per
channel group i (the four branch outputs, widths w_i) s = LayerNorm(branch), the bidirectional
Mamba block (:func:`salmm.model.mamba_cpu.block_forward`) plus skip_scale * s, and the groups
concatenated and LayerNormed. Some 200 PyTorch operators and their backward (the Inception's
six convolutions, ReLUs and max-pool, five LayerNorms, the transposed copies between channels
and pixel sequences, the skip, the concatenations, four Mamba calls) become one kernel call
each way. The module's own path (backend ``"builtin"``) is the ``_ref`` twin
(``tests/test_layer_train_cpu.py``: every gradient in float64, gradcheck).

Per frame of the batch, channel-major [C, L] rows inside (L = H * W pixels in raster order);
the input and output are pixel-major (channels-last memory, as the rest of the model keeps
them). The layer's weights are :func:`salmm.model.layer_cpu.pack`'s buffer. Backward:

* LayerNorm: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) over a pixel's channels;
* a ReLU passes the gradient where its output is above 0 (as PyTorch's);
* a k x k convolution: dx = the gradient correlated with the flipped kernel, dw = sums of the
  gradient times the shifted input, over whole rows as the forward (zero padding);
* the 3x3 max-pool (stride 1, the border ignored): each window's gradient goes to the pixel
  PyTorch's max-pool takes, the first maximum in raster order or the last NaN.

Every sum runs in a fixed order and each frame's weight gradients go to their own buffer,
summed in frame order: results do not depend on the thread count. float32, or float64 for
float64 inputs.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from salmm.model.layer_cpu import (
    DIMS,
    GROUP_PIECES,
    GROUPS,
    INCEPTION_PIECES,
    affine,
    column_ok,
    inception,
    max_pool3,
    normalise,
    pack,
    piece,
    tap_range,
)
from salmm.model.mamba_cpu import (
    accumulate_outer,
    block_backward,
    block_forward,
    packed_gradients,
    row_dots,
    row_totals,
    saved_length,
    sum_rows,
    transposed_product,
)
from salmm.model.numba_math import claim
from salmm.model.scan_cpu import run_jobs, workspace

__all__ = ["layer_forward"]

_BLOCK = 2  # a group's Mamba pieces start this many pieces into the group (after its LayerNorm)
_BLOCK_PIECES = 17  # in_proj, 2 x 7 per direction, out_proj weight and bias


def layer_forward(layer, x: Tensor) -> Tensor:
    """``layer`` (an SCPMambaLayer) on x [B, C_in, H, W] (CPU, float32 or float64, any memory
    format) -> [B, C_out, H, W] in channels-last memory, differentiable in x and every weight
    of the layer."""
    packed = pack(layer, x.dtype, x.shape[2], x.shape[3])
    blocks = np.asarray([(m.d_model, m.d_inner, m.dt_rank, m.d_state, m.d_conv) for m in
                         (layer.mamba1, layer.mamba2, layer.mamba3, layer.mamba4)], dtype=np.int64)
    return _FusedLayer.apply(packed, blocks, x, *packed.sources)


class _FusedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, blocks, x, *params):
        batch, c_in, height, width = x.shape
        dims = packed.dims
        c_out, reduced = int(dims[1] + dims[3] + dims[5] + dims[6]), int(dims[2] + dims[4])
        length = height * width
        weights = packed.weights.numpy().copy()  # this call's weights, for its backward too
        starts = np.cumsum([0] + [saved_length(b, length) for b in blocks]).astype(np.int64)
        # (reused across steps: a fresh buffer this size costs as much in page faults as the
        # forward's writes into it)
        saved = workspace.take((batch, int(starts[-1])), x.dtype).numpy()
        # per frame: the branches and the 1x1 reductions after their ReLU, the groups' and the
        # final LayerNorm's xhat, their five rstd rows
        rows = np.empty((batch, 3 * c_out + reduced + GROUPS + 1, length), dtype=weights.dtype)
        pixels = x.detach().permute(0, 2, 3, 1).contiguous()  # a view for channels-last x
        out = torch.empty(batch, height, width, c_out, dtype=x.dtype)
        run_jobs(_forward_kernel, (pixels.numpy().reshape(batch, length, c_in), weights,
                                   packed.offsets, dims, blocks, starts, saved, rows,
                                   out.numpy().reshape(batch, length, c_out)), batch)
        ctx.saved = (packed, blocks, weights, starts, saved, rows, pixels)
        ctx.dtypes = [p.dtype for p in params]
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gout):
        packed, blocks, weights, starts, saved, rows, pixels = ctx.saved
        batch, height, width, c_in = pixels.shape
        c_out, length = gout.shape[1], height * width
        gx = torch.empty(batch, height, width, c_in, dtype=gout.dtype)
        partial = np.zeros((batch, weights.shape[0]), dtype=weights.dtype)
        g = gout.detach().permute(0, 2, 3, 1).contiguous().numpy().reshape(batch, length, c_out)
        run_jobs(_backward_kernel, (g, pixels.numpy().reshape(batch, length, c_in), weights,
                                    packed.offsets, packed.dims, blocks, starts, saved, rows,
                                    gx.numpy().reshape(batch, length, c_in), partial), batch)
        needs = ctx.needs_input_grad
        return (None, None, gx.permute(0, 3, 1, 2) if needs[2] else None,
                *packed_gradients(packed, sum_rows(partial), ctx.dtypes, needs[3:]))


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _block_offsets(offsets, g):
    """Where the pieces of group g's Mamba block start (its 17 pieces and the end)."""
    first = INCEPTION_PIECES + g * GROUP_PIECES + _BLOCK
    return offsets[first:first + _BLOCK_PIECES + 1]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _frame_rows(rows, dims):
    """A frame's saved rows [3 c_out + c3x3red + c5x5red + 5, L] as (branches [c_out, L],
    reduced3, reduced5, xhat [2 c_out, L]: the groups' then the final LayerNorm's, rstd [5, L])."""
    c_out = dims[1] + dims[3] + dims[5] + dims[6]
    c2r, c3r = dims[2], dims[4]
    return (rows[:c_out], rows[c_out:c_out + c2r], rows[c_out + c2r:c_out + c2r + c3r],
            rows[c_out + c2r + c3r:3 * c_out + c2r + c3r], rows[3 * c_out + c2r + c3r:])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _forward_kernel(x, weights, offsets, dims, blocks, starts, saved, rows, out, counter):
    """Frames claimed from counter: x [B, L, C_in] -> out [B, L, C_out]. Saved per frame: the
    Mamba blocks' buffers (saved[r, starts[g]:starts[g + 1]]) and :func:`_frame_rows`."""
    c_in, length = x.shape[2], x.shape[1]
    channels = out.shape[2]
    dtype = out.dtype
    end = INCEPTION_PIECES + GROUPS * GROUP_PIECES
    skip = piece(weights, offsets, end + 2)[0]
    planes = np.empty((c_in, length), dtype=dtype)
    pooled = np.empty((c_in, length), dtype=dtype)
    mean = np.empty(length, dtype=dtype)
    mixed = np.empty((channels, length), dtype=dtype)
    final = np.empty((channels, length), dtype=dtype)
    ok3, ok5 = column_ok(3, dims[7], dims[8]), column_ok(5, dims[7], dims[8])
    r = claim(counter)
    while r < x.shape[0]:
        branches, reduced3, reduced5, xhat, rstd = _frame_rows(rows[r], dims)
        planes[:] = x[r].T
        inception(planes, weights, offsets, dims, ok3, ok5, branches, reduced3, reduced5,
                  pooled)
        row = 0
        for g in range(GROUPS):
            width = blocks[g, 0]
            base = INCEPTION_PIECES + g * GROUP_PIECES
            gain, bias = piece(weights, offsets, base), piece(weights, offsets, base + 1)
            normalise(branches, row, width, mean, rstd[g], xhat[row:row + width])
            s = np.empty((width, length), dtype=dtype)
            affine(xhat[row:row + width], gain, bias, s)
            product = np.empty((width, length), dtype=dtype)
            block_forward(s, weights, _block_offsets(offsets, g), blocks[g],
                          saved[r, starts[g]:starts[g + 1]], product)
            for c in range(width):
                for p in range(length):
                    mixed[row + c, p] = product[c, p] + skip * s[c, p]
            row += width
        normalise(mixed, 0, channels, mean, rstd[GROUPS], xhat[channels:])
        gain, bias = piece(weights, offsets, end), piece(weights, offsets, end + 1)
        affine(xhat[channels:], gain, bias, final)
        out[r] = final.T
        r = claim(counter)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _normalise_backward(gy, xhat, rstd, gain, g_gain, g_bias, gx, row):
    """Through y = xhat * gain + bias over a pixel's channels (gy, xhat [w, L], rstd [L]):
    gx[row + c] = dL/dx; g_gain, g_bias [w] accumulated."""
    width, length = gy.shape
    f = gy.dtype.type
    m1, m2 = np.zeros(length, dtype=gy.dtype), np.zeros(length, dtype=gy.dtype)
    gxhat = np.empty((width, length), dtype=gy.dtype)
    for c in range(width):
        for p in range(length):
            gxhat[c, p] = gy[c, p] * gain[c]
            m1[p] += gxhat[c, p]
            m2[p] += gxhat[c, p] * xhat[c, p]
    row_dots(gy, xhat, g_gain)
    row_totals(gy, g_bias)
    for p in range(length):
        m1[p] /= f(width)
        m2[p] /= f(width)
    for c in range(width):
        for p in range(length):
            gx[row + c, p] = rstd[p] * (gxhat[c, p] - m1[p] - xhat[c, p] * m2[p])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _relu_backward(g, out, into, g_bias):
    """into = g where the ReLU's output ``out`` is above 0, else 0 (rows [c, L]); g_bias [c]
    accumulates the sums of into (the bias before the ReLU)."""
    f = g.dtype.type
    for c in range(g.shape[0]):
        for p in range(g.shape[1]):
            into[c, p] = g[c, p] if out[c, p] > 0.0 else f(0.0)
    row_totals(into, g_bias)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _pointwise_backward(g, x, w, gw, gx):
    """Through out = w x + b (x [c_in, L], w [c_out, c_in], g = dL/dout [c_out, L]): gw
    accumulated, gx += w^T g."""
    accumulate_outer(g, x, gw)
    back = np.empty_like(gx)
    transposed_product(w, g, back)
    for i in range(gx.shape[0]):
        for p in range(gx.shape[1]):
            gx[i, p] += back[i, p]


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _spatial_backward(x, w, height, width, ok, g, gx, gw):
    """Through a k x k convolution (zero padding k // 2) of x [c_in, H*W] by w [c_out, c_in, k,
    k], g = dL/d(its output) [c_out, H*W]: gx = dL/dx [c_in, H*W] (set), gw accumulated (its
    sums reassociated to vectorise); the taps (and ok) as
    :func:`salmm.model.layer_cpu.spatial`'s."""
    c_out, c_in, k, _ = w.shape
    pad = k // 2
    zero = g.dtype.type(0.0)
    gx[:] = 0.0
    for o in range(c_out):
        for i in range(c_in):
            for ky in range(k):
                for kx in range(k):
                    first, last, shift = tap_range(ky, kx, pad, height, width)
                    weight, inside, grad = w[o, i, ky, kx], ok[kx, first:last], g[o, first:last]
                    source = x[i, first + shift:last + shift]
                    into = gx[i, first + shift:last + shift]
                    total = zero
                    for p in range(grad.shape[0]):
                        into[p] += weight * grad[p] if inside[p] else zero
                        total += grad[p] * source[p] if inside[p] else zero
                    gw[o, i, ky, kx] += total


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _max_pool3_backward(x, height, width, ok, g, gx):
    """Through the 3x3 max-pool (stride 1, border ignored) of x [C, H*W]: gx += each pixel's
    gradient g [C, H*W] at the pixel PyTorch's max-pool takes, the first maximum of the window
    in raster order or its last NaN. The taps in raster order as shifted slices of the flat
    map (selects: the loops vectorise; ok: :func:`salmm.model.layer_cpu.column_ok` for 3),
    then one scatter."""
    length = height * width
    best, at = np.empty(length, dtype=x.dtype), np.empty(length, dtype=np.int32)
    for c in range(x.shape[0]):
        best[:] = -np.inf
        at[:] = -1
        for ky in range(3):
            for kx in range(3):
                first, last, shift = tap_range(ky, kx, 1, height, width)
                inside, top, where = ok[kx, first:last], best[first:last], at[first:last]
                source = x[c, first + shift:last + shift]
                for p in range(source.shape[0]):
                    v = source[p]
                    take = (inside[p] != 0) & ((where[p] < 0) | (v > top[p]) | np.isnan(v))
                    top[p] = v if take else top[p]
                    where[p] = np.int32(first + shift + p) if take else where[p]
        grad, into = g[c], gx[c]
        for p in range(length):
            into[at[p]] += grad[p]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _backward_kernel(gout, x, weights, offsets, dims, blocks, starts, saved, rows, gx, partial,
                     counter):
    """Frames claimed from counter: gout [B, L, C_out] and the forward's input x [B, L, C_in]
    -> gx [B, L, C_in], each frame's weight gradients into partial[r] (laid out as the
    weights)."""
    c_in, c1, c2r, c2, c3r, c3, c4, height, width = dims[:DIMS - 1]
    channels, length = gout.shape[2], gout.shape[1]
    dtype = gx.dtype
    end = INCEPTION_PIECES + GROUPS * GROUP_PIECES
    skip = piece(weights, offsets, end + 2)[0]
    g_final = np.empty((channels, length), dtype=dtype)
    g_mixed = np.empty((channels, length), dtype=dtype)
    g_branches = np.empty((channels, length), dtype=dtype)
    g_relu = np.empty((channels, length), dtype=dtype)
    planes, pooled = np.empty((c_in, length), dtype=dtype), np.empty((c_in, length), dtype=dtype)
    g_planes = np.empty((c_in, length), dtype=dtype)
    g_pooled = np.zeros((c_in, length), dtype=dtype)
    g_reduced = np.empty((max(c2r, c3r), length), dtype=dtype)
    ok3, ok5 = column_ok(3, height, width), column_ok(5, height, width)
    r = claim(counter)
    while r < gout.shape[0]:
        grads = partial[r]
        branches, reduced3, reduced5, xhat, rstd = _frame_rows(rows[r], dims)
        g_final[:] = gout[r].T
        _normalise_backward(g_final, xhat[channels:], rstd[GROUPS], piece(weights, offsets, end),
                            piece(grads, offsets, end), piece(grads, offsets, end + 1), g_mixed, 0)
        g_skip = dtype.type(0.0)
        row = 0
        for g in range(GROUPS):
            width_g = blocks[g, 0]
            base = INCEPTION_PIECES + g * GROUP_PIECES
            gain, bias = piece(weights, offsets, base), piece(weights, offsets, base + 1)
            s = np.empty((width_g, length), dtype=dtype)  # as the forward made it
            g_product = np.empty((width_g, length), dtype=dtype)
            affine(xhat[row:row + width_g], gain, bias, s)
            g_product[:] = g_mixed[row:row + width_g]
            per_channel = np.zeros(width_g, dtype=dtype)
            row_dots(g_product, s, per_channel)
            for c in range(width_g):
                g_skip += per_channel[c]
            gs = np.empty((width_g, length), dtype=dtype)
            block_backward(g_product, weights, _block_offsets(offsets, g), blocks[g],
                           saved[r, starts[g]:starts[g + 1]], grads, gs)
            for c in range(width_g):
                for p in range(length):
                    gs[c, p] += skip * g_product[c, p]
            _normalise_backward(gs, xhat[row:row + width_g], rstd[g], gain,
                                piece(grads, offsets, base), piece(grads, offsets, base + 1),
                                g_branches, row)
            row += width_g
        piece(grads, offsets, end + 2)[0] += g_skip
        # the Inception, branch by branch, into g_planes
        planes[:] = x[r].T
        g_planes[:] = 0.0
        _relu_backward(g_branches[:c1], branches[:c1], g_relu[:c1], piece(grads, offsets, 1))
        _pointwise_backward(g_relu[:c1], planes, piece(weights, offsets, 0).reshape(c1, c_in),
                            piece(grads, offsets, 0).reshape(c1, c_in), g_planes)
        for first, mid, size, reduced, ok, i in ((c1, c2r, c2, reduced3, ok3, 2),
                                                 (c1 + c2, c3r, c3, reduced5, ok5, 6)):
            k = ok.shape[0]
            _relu_backward(g_branches[first:first + size], branches[first:first + size],
                           g_relu[:size], piece(grads, offsets, i + 3))
            g_mid = g_reduced[:mid]
            _spatial_backward(reduced, piece(weights, offsets, i + 2).reshape(size, mid, k, k),
                              height, width, ok, g_relu[:size], g_mid,
                              piece(grads, offsets, i + 2).reshape(size, mid, k, k))
            _relu_backward(g_mid, reduced, g_mid, piece(grads, offsets, i + 1))
            _pointwise_backward(g_mid, planes, piece(weights, offsets, i).reshape(mid, c_in),
                                piece(grads, offsets, i).reshape(mid, c_in), g_planes)
        first = c1 + c2 + c3
        _relu_backward(g_branches[first:first + c4], branches[first:first + c4], g_relu[:c4],
                       piece(grads, offsets, 11))
        max_pool3(planes, height, width, ok3, pooled)
        g_pooled[:] = 0.0
        _pointwise_backward(g_relu[:c4], pooled, piece(weights, offsets, 10).reshape(c4, c_in),
                            piece(grads, offsets, 10).reshape(c4, c_in), g_pooled)
        _max_pool3_backward(planes, height, width, ok3, g_pooled, g_planes)
        gx[r] = g_planes.T
        r = claim(counter)
