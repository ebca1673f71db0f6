"""An SCPMamba layer's four Mamba groups as one differentiable numba kernel pair: training speed.

What :meth:`salmm.model.net.SCPMambaLayer.forward` computes after its Inception, forward and
backward, for CPU tensors under autograd: per channel group i (the Inception's four branch
outputs, widths w_i) s = LayerNorm(branch), then the bidirectional Mamba block
(:func:`salmm.model.mamba_cpu.block_forward`) plus skip_scale * s; the groups concatenated and
LayerNormed. Some 60 PyTorch operators and their backward (five LayerNorms, the transposed
copies between the channel-first branches and the pixel sequences, the skip, the
concatenation, four Mamba calls) become one kernel call each way. The module's own path
(backend ``"builtin"``) is the ``_ref`` twin (``tests/test_groups_cpu.py``: every gradient in
float64, gradcheck).

Per frame of the batch, channel-major [C, L] rows inside (L = H * W pixels in raster order):
the kernels read the branches as the Inception wrote them (channels-first [B, C, H, W]) and
write the output pixel-major (channels-last memory, like the rest of the model). The layer's
weights are :func:`salmm.model.layer_cpu.pack`'s buffer (the Inception's pieces unused here).
LayerNorm as :func:`salmm.model.layer_cpu.normalise`; its backward
dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) over the channels of a pixel. Every
sum runs in a fixed order and each frame's weight gradients go to their own buffer, summed in
frame order: results do not depend on the thread count. float32, or float64 for float64
inputs.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from salmm.model.layer_cpu import (
    GROUP_PIECES,
    GROUPS,
    INCEPTION_PIECES,
    normalise,
    pack,
    piece,
)
from salmm.model.mamba_cpu import block_backward, block_forward, saved_length, sum_rows
from salmm.model.numba_math import claim
from salmm.model.scan_cpu import run_jobs, workspace

__all__ = ["groups_forward"]

_BLOCK = 2  # a group's Mamba pieces start this many pieces into the group (after its LayerNorm)
_BLOCK_PIECES = 17  # in_proj, 2 x 7 per direction, out_proj weight and bias


def groups_forward(layer, branches: Tensor) -> Tensor:
    """``layer`` (an SCPMambaLayer) after its Inception: branches [B, C_out, H, W] (the four
    branch outputs concatenated; CPU, float32 or float64) -> [B, C_out, H, W] in channels-last
    memory, differentiable in branches and every weight of the groups."""
    packed = pack(layer, branches.dtype, branches.shape[2], branches.shape[3])
    chosen = [i for i, number in enumerate(packed.tensors) if number >= INCEPTION_PIECES]
    blocks = np.asarray([(m.d_model, m.d_inner, m.dt_rank, m.d_state, m.d_conv) for m in
                         (layer.mamba1, layer.mamba2, layer.mamba3, layer.mamba4)], dtype=np.int64)
    return _FusedGroups.apply(packed, chosen, blocks, branches,
                              *(packed.sources[i] for i in chosen))


class _FusedGroups(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, chosen, blocks, branches, *params):
        batch, channels, height, width = branches.shape
        length = height * width
        weights = packed.weights.numpy().copy()  # this call's weights, for its backward too
        starts = np.cumsum([0] + [saved_length(b, length) for b in blocks]).astype(np.int64)
        # (reused across steps: a fresh buffer this size costs as much in page faults as the
        # forward's writes into it)
        saved = workspace.take((batch, int(starts[-1])), branches.dtype).numpy()
        norms = np.empty((batch, 2 * channels + GROUPS + 1, length), dtype=weights.dtype)
        out = torch.empty(batch, height, width, channels, dtype=branches.dtype)
        x = branches.detach().contiguous().numpy().reshape(batch, channels, length)
        run_jobs(_forward_kernel, (x, weights, packed.offsets, blocks, starts, saved, norms,
                                   out.numpy().reshape(batch, length, channels)), batch)
        ctx.saved = (packed, chosen, blocks, weights, starts, saved, norms)
        ctx.dtypes = [p.dtype for p in params]
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gout):
        packed, chosen, blocks, weights, starts, saved, norms = ctx.saved
        batch, channels, height, width = gout.shape
        length = height * width
        gbranches = torch.empty(batch, channels, height, width, dtype=gout.dtype)
        partial = np.zeros((batch, weights.shape[0]), dtype=weights.dtype)
        g = gout.detach().permute(0, 2, 3, 1).contiguous().numpy().reshape(batch, length, channels)
        run_jobs(_backward_kernel, (g, weights, packed.offsets, blocks, starts, saved, norms,
                                    gbranches.numpy().reshape(batch, channels, length), partial),
                 batch)
        total = torch.from_numpy(sum_rows(partial))
        offsets = packed.offsets
        grads = [total[offsets[packed.tensors[i]]:offsets[packed.tensors[i] + 1]]
                 .view(packed.sources[i].shape).to(dtype) for i, dtype in zip(chosen, ctx.dtypes)]
        needs = ctx.needs_input_grad
        return (None, None, None, gbranches if needs[3] else None,
                *(g if need else None for g, need in zip(grads, needs[4:])))


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _block_offsets(offsets, g):
    """Where the pieces of group g's Mamba block start (its 17 pieces and the end)."""
    first = INCEPTION_PIECES + g * GROUP_PIECES + _BLOCK
    return offsets[first:first + _BLOCK_PIECES + 1]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _forward_kernel(branches, weights, offsets, blocks, starts, saved, norms, out, counter):
    """Frames claimed from counter: branches [B, C, L] -> out [B, L, C]. Saved per frame: the
    Mamba blocks' rows (saved[r, starts[g]:starts[g + 1]]) and in norms[r] the groups' xhat
    (rows 0..C-1), the final LayerNorm's xhat (C..2C-1) and the five rstd rows."""
    channels, length = branches.shape[1], branches.shape[2]
    dtype = out.dtype
    end = INCEPTION_PIECES + GROUPS * GROUP_PIECES
    skip = piece(weights, offsets, end + 2)[0]
    mean = np.empty(length, dtype=dtype)
    mixed = np.empty((channels, length), dtype=dtype)
    final = np.empty((channels, length), dtype=dtype)
    r = claim(counter)
    while r < branches.shape[0]:
        xhat, rstd = norms[r, :2 * channels], norms[r, 2 * channels:]
        row = 0
        for g in range(GROUPS):
            width = blocks[g, 0]
            base = INCEPTION_PIECES + g * GROUP_PIECES
            gain, bias = piece(weights, offsets, base), piece(weights, offsets, base + 1)
            normalise(branches[r], row, width, mean, rstd[g], xhat[row:row + width])
            s = np.empty((width, length), dtype=dtype)
            for c in range(width):
                for p in range(length):
                    s[c, p] = xhat[row + c, p] * gain[c] + bias[c]
            product = np.empty((width, length), dtype=dtype)
            block_forward(s, weights, _block_offsets(offsets, g), blocks[g],
                          saved[r, starts[g]:starts[g + 1]], product)
            for c in range(width):
                for p in range(length):
                    mixed[row + c, p] = product[c, p] + skip * s[c, p]
            row += width
        normalise(mixed, 0, channels, mean, rstd[GROUPS], xhat[channels:])
        gain, bias = piece(weights, offsets, end), piece(weights, offsets, end + 1)
        for c in range(channels):
            for p in range(length):
                final[c, p] = xhat[channels + c, p] * gain[c] + bias[c]
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
        total_gain, total_bias = f(0.0), f(0.0)
        for p in range(length):
            gxhat[c, p] = gy[c, p] * gain[c]
            m1[p] += gxhat[c, p]
            m2[p] += gxhat[c, p] * xhat[c, p]
        for p in range(length):
            total_gain += gy[c, p] * xhat[c, p]
            total_bias += gy[c, p]
        g_gain[c] += total_gain
        g_bias[c] += total_bias
    for p in range(length):
        m1[p] /= f(width)
        m2[p] /= f(width)
    for c in range(width):
        for p in range(length):
            gx[row + c, p] = rstd[p] * (gxhat[c, p] - m1[p] - xhat[c, p] * m2[p])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _backward_kernel(gout, weights, offsets, blocks, starts, saved, norms, gbranches, partial,
                     counter):
    """Frames claimed from counter: gout [B, L, C] -> gbranches [B, C, L], each frame's weight
    gradients into partial[r] (laid out as the weights)."""
    channels, length = gbranches.shape[1], gbranches.shape[2]
    dtype = gbranches.dtype
    end = INCEPTION_PIECES + GROUPS * GROUP_PIECES
    skip = piece(weights, offsets, end + 2)[0]
    g_final = np.empty((channels, length), dtype=dtype)
    g_mixed = np.empty((channels, length), dtype=dtype)
    r = claim(counter)
    while r < gout.shape[0]:
        grads = partial[r]
        xhat, rstd = norms[r, :2 * channels], norms[r, 2 * channels:]
        g_final[:] = gout[r].T
        _normalise_backward(g_final, xhat[channels:], rstd[GROUPS], piece(weights, offsets, end),
                            piece(grads, offsets, end), piece(grads, offsets, end + 1), g_mixed, 0)
        g_skip = dtype.type(0.0)
        row = 0
        for g in range(GROUPS):
            width = blocks[g, 0]
            base = INCEPTION_PIECES + g * GROUP_PIECES
            gain, bias = piece(weights, offsets, base), piece(weights, offsets, base + 1)
            s = np.empty((width, length), dtype=dtype)  # as the forward made it
            g_product = np.empty((width, length), dtype=dtype)
            for c in range(width):
                for p in range(length):
                    s[c, p] = xhat[row + c, p] * gain[c] + bias[c]
                    g_product[c, p] = g_mixed[row + c, p]
            for c in range(width):
                for p in range(length):
                    g_skip += g_product[c, p] * s[c, p]
            gs = np.empty((width, length), dtype=dtype)
            block_backward(g_product, weights, _block_offsets(offsets, g), blocks[g],
                           saved[r, starts[g]:starts[g + 1]], grads, gs)
            for c in range(width):
                for p in range(length):
                    gs[c, p] += skip * g_product[c, p]
            _normalise_backward(gs, xhat[row:row + width], rstd[g], gain,
                                piece(grads, offsets, base), piece(grads, offsets, base + 1),
                                gbranches[r], row)
            row += width
        piece(grads, offsets, end + 2)[0] += g_skip
        r = claim(counter)
