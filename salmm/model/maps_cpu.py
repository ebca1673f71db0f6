"""Per-map CPU kernels on channels-last maps, one numba call each: GroupNorm (optionally followed
by a 2x2 max-pool) and the spatial attention bridge, for CPU inference (no autograd).

``group_norm``: what SalMM's ``GroupNorm`` (then ``F.max_pool2d(., 2, 2)`` in the encoder)
computes. PyTorch's channels-first GroupNorm needs the map copied to channels-first memory and
back (its channels-last kernel is far less accurate), and max-pool computes indices nobody
uses. Here the map is read where it lies: per (frame, group) the mean and the biased variance
come from the per-channel sums of x and x^2 in float64 (one pass, a fixed order: no
dependence on threads), then
y = x * scale[c] + shift[c] with scale = rstd * weight, shift = bias - mean * scale (the form
PyTorch applies), and the 2x2 maximum of y (NaN propagates) when pooling.

``spatial_attention``: the bridge's [channel mean, channel max] planes, its dilated 7x7
two-channel convolution written out over whole rows (PyTorch runs it as a slow im2col), the
sigmoid, and the products the bridge makes of it, with the channel means its channel attention
needs. The modules' own forward is the ``_ref`` twin (``tests/test_layer_cpu.py``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from salmm.model.numba_math import sigmoid

__all__ = ["group_norm", "group_norm_autograd", "saliency_head", "spatial_attention"]


def group_norm(norm: nn.GroupNorm, x: Tensor, pool: bool = False) -> Tensor:
    """``norm`` on x [B, C, H, W] (CPU, float32 / float64), then a 2x2 max-pool when ``pool``
    (H, W even) -> [B, C, H', W'] in channels-last memory, x's dtype. No autograd."""
    batch, channels, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1).contiguous()  # a view for channels-last x
    scale = 2 if pool else 1
    out = torch.empty(batch, height // scale, width // scale, channels, dtype=x.dtype)
    weight, bias = _affine(norm, x.dtype, channels)
    stats = np.empty((2, batch, norm.num_groups))
    _group_norm_kernel(pixels.numpy(), norm.num_groups, norm.eps, weight, bias, pool, out.numpy(),
                       stats)
    return out.permute(0, 3, 1, 2)


def _affine(norm: nn.GroupNorm, dtype: torch.dtype, channels: int) -> tuple[np.ndarray, ...]:
    """A GroupNorm's weight and bias in ``dtype`` (ones and zeros when it has none)."""
    if norm.affine:
        return tuple(t.detach().to(dtype).numpy() for t in (norm.weight, norm.bias))
    return torch.ones(channels, dtype=dtype).numpy(), torch.zeros(channels, dtype=dtype).numpy()


def group_norm_autograd(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """``norm`` on x [B, C, H, W] (CPU, float32 / float64) for training: differentiable in x
    and the affine parameters, computed on channels-last memory where PyTorch copies to
    channels-first and back (forward and backward) -> [B, C, H, W] channels-last."""
    return _GroupNorm.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


class _GroupNorm(torch.autograd.Function):
    """y = (x - mean_g) * rstd_g * weight_c + bias_c; backward: gbias = sum gy,
    gweight = sum gy * xhat, gx = rstd (g - mean_g(g) - xhat mean_g(g xhat)) with g = gy weight,
    every sum in float64."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        batch, channels, height, width = x.shape
        pixels = x.detach().permute(0, 2, 3, 1).contiguous()
        out = torch.empty(batch, height, width, channels, dtype=x.dtype)
        w = weight.detach().to(x.dtype).numpy()
        stats = np.empty((2, batch, groups))
        _group_norm_kernel(pixels.numpy(), groups, eps, w, bias.detach().to(x.dtype).numpy(),
                           False, out.numpy(), stats)
        ctx.save_for_backward(pixels)
        ctx.stats, ctx.weight, ctx.dtypes = stats, w, (weight.dtype, bias.dtype)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gout):
        (pixels,) = ctx.saved_tensors
        g = gout.permute(0, 2, 3, 1).contiguous().to(pixels.dtype)
        gx = torch.empty_like(pixels)
        channels = pixels.shape[-1]
        gweight, gbias = np.zeros(channels), np.zeros(channels)
        _group_norm_backward_kernel(pixels.numpy(), g.numpy(), ctx.weight, ctx.stats,
                                    gx.numpy(), gweight, gbias)
        return (gx.permute(0, 3, 1, 2), torch.from_numpy(gweight).to(ctx.dtypes[0]),
                torch.from_numpy(gbias).to(ctx.dtypes[1]), None, None)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _group_norm_backward_kernel(x, g, weight, stats, gx, gweight, gbias):
    """x, g (dL/dy), gx [B, H, W, C]; stats [2, B, groups] (mean, rstd); gweight, gbias [C]
    accumulated in float64."""
    batch, height, width, channels = x.shape
    groups = stats.shape[2]
    per_group = channels // groups
    count = height * width * per_group
    sums = np.empty(channels)
    products = np.empty(channels)
    alpha, beta, gamma = np.empty(channels), np.empty(channels), np.empty(channels)
    for b in range(batch):
        frame, grad, into = (x[b].reshape(-1, channels), g[b].reshape(-1, channels),
                             gx[b].reshape(-1, channels))
        sums[:] = 0.0
        products[:] = 0.0
        for p in range(frame.shape[0]):
            for c in range(channels):
                gy = np.float64(grad[p, c])
                sums[c] += gy
                products[c] += gy * frame[p, c]
        for group in range(groups):
            mean, rstd = stats[0, b, group], stats[1, b, group]
            mean_g, mean_gx = 0.0, 0.0
            for c in range(group * per_group, (group + 1) * per_group):
                # sum over the group of gy * w and gy * w * xhat (xhat = (x - mean) rstd)
                gbias[c] += sums[c]
                gweight[c] += (products[c] - mean * sums[c]) * rstd
                mean_g += sums[c] * weight[c]
                mean_gx += (products[c] - mean * sums[c]) * rstd * weight[c]
            mean_g /= count
            mean_gx /= count
            for c in range(group * per_group, (group + 1) * per_group):
                # gx = rstd (gy w - mean_g - (x - mean) rstd mean_gx) = alpha gy - beta x + gamma
                alpha[c] = rstd * weight[c]
                beta[c] = rstd * rstd * mean_gx
                gamma[c] = rstd * rstd * mean_gx * mean - rstd * mean_g
        for p in range(frame.shape[0]):
            for c in range(channels):
                into[p, c] = alpha[c] * grad[p, c] - beta[c] * frame[p, c] + gamma[c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _group_norm_kernel(x, groups, eps, weight, bias, pool, out, stats):
    """x [B, H, W, C] -> out [B, H', W', C] (see the module docstring); stats [2, B, groups]
    receives each group's mean and rstd."""
    batch, height, width, channels = x.shape
    per_group = channels // groups
    count = height * width * per_group
    sums = np.empty(channels, dtype=np.float64)
    squares = np.empty(channels, dtype=np.float64)
    scale = np.empty(channels, dtype=x.dtype)
    shift = np.empty(channels, dtype=x.dtype)
    for b in range(batch):
        frame = x[b].reshape(height * width, channels)
        sums[:] = 0.0
        squares[:] = 0.0
        for p in range(height * width):
            for c in range(channels):
                v = np.float64(frame[p, c])
                sums[c] += v
                squares[c] += v * v
        for g in range(groups):
            total, total2 = 0.0, 0.0
            for c in range(g * per_group, (g + 1) * per_group):
                total += sums[c]
                total2 += squares[c]
            mean = total / count
            rstd = 1.0 / np.sqrt(max(total2 / count - mean * mean, 0.0) + eps)
            stats[0, b, g], stats[1, b, g] = mean, rstd
            for c in range(g * per_group, (g + 1) * per_group):
                scale[c] = rstd * weight[c]
                shift[c] = bias[c] - mean * rstd * weight[c]
        if not pool:
            target = out[b].reshape(height * width, channels)
            for p in range(height * width):
                for c in range(channels):
                    target[p, c] = frame[p, c] * scale[c] + shift[c]
            continue
        for oy in range(height // 2):
            top, bottom, target = x[b, 2 * oy], x[b, 2 * oy + 1], out[b, oy]
            for ox in range(width // 2):
                for c in range(channels):
                    best = top[2 * ox, c] * scale[c] + shift[c]
                    for v in (top[2 * ox + 1, c] * scale[c] + shift[c],
                              bottom[2 * ox, c] * scale[c] + shift[c],
                              bottom[2 * ox + 1, c] * scale[c] + shift[c]):
                        best = v if v > best or np.isnan(v) else best
                    target[ox, c] = best


def spatial_attention(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SalMM's spatial attention bridge on one map x [B, C, H, W] (CPU, channels-last or not):
    a = sigmoid(conv([channel mean, channel max])) with ``conv`` the shared dilated 2 -> 1
    convolution, then (s, mixed, pooled) = (a * x, a * x + x, the channel means of mixed
    [B, C]); s and mixed [B, C, H, W] in channels-last memory. No autograd."""
    batch, channels = x.shape[:2]
    pixels = x.permute(0, 2, 3, 1).contiguous()
    s, mixed = torch.empty_like(pixels), torch.empty_like(pixels)
    pooled = torch.empty(batch, channels, dtype=x.dtype)
    weight = conv.weight.detach().to(x.dtype)[0].contiguous().numpy()  # [2, k, k]
    bias = conv.bias.detach().to(x.dtype).numpy()
    _spatial_attention_kernel(pixels.numpy(), weight, bias[0], conv.dilation[0], conv.padding[0],
                              s.numpy(), mixed.numpy(), pooled.numpy())
    return s.permute(0, 3, 1, 2), mixed.permute(0, 3, 1, 2), pooled


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _spatial_attention_kernel(x, weight, bias, dilation, padding, s, mixed, pooled):
    """x, s, mixed [B, H, W, C]; weight [2, k, k]; pooled [B, C] (see spatial_attention)."""
    batch, height, width, channels = x.shape
    f = x.dtype.type
    taps = weight.shape[1]
    planes = np.empty((2, height, width), dtype=x.dtype)
    logits = np.empty((height, width), dtype=x.dtype)
    sums = np.empty(channels, dtype=np.float64)
    for b in range(batch):
        frame, means, maxima = x[b].reshape(-1, channels), planes[0].ravel(), planes[1].ravel()
        for p in range(means.shape[0]):
            total, best = f(0.0), frame[p, 0]
            for c in range(channels):
                v = frame[p, c]
                total += v
                best = v if v > best or np.isnan(v) else best
            means[p] = total / f(channels)
            maxima[p] = best
        logits[:] = bias
        for plane in range(2):
            for ky in range(taps):
                dy = ky * dilation - padding
                for kx in range(taps):
                    w, dx = weight[plane, ky, kx], kx * dilation - padding
                    x0, x1 = max(0, -dx), min(width, width - dx)
                    if x1 <= x0:  # (a negative slice end would count from the end)
                        continue
                    for py in range(max(0, -dy), min(height, height - dy)):
                        target = logits[py, x0:x1]  # slices: a computed (possibly negative)
                        source = planes[plane, py + dy, x0 + dx:x1 + dx]  # index would not
                        for i in range(target.shape[0]):  # vectorise (numba's wraparound)
                            target[i] += w * source[i]
        gates = logits.ravel()
        for p in range(gates.shape[0]):
            gates[p] = sigmoid(gates[p], f)[0]
        frame, weighted, both = (x[b].reshape(-1, channels), s[b].reshape(-1, channels),
                                 mixed[b].reshape(-1, channels))
        sums[:] = 0.0
        for p in range(gates.shape[0]):
            for c in range(channels):
                v = frame[p, c]
                weighted[p, c] = gates[p] * v
                both[p, c] = gates[p] * v + v
                sums[c] += both[p, c]
        for c in range(channels):
            pooled[b, c] = sums[c] / (height * width)


def saliency_head(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """SalMM's last step on x [B, C, h, w] (CPU, any memory format): sigmoid of the 2x bilinear
    upsampling (align_corners=True) of the 1x1 convolution ``conv`` (C -> 1) -> [B, 1, 2h, 2w]
    in x's dtype. No autograd."""
    batch, channels, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1).contiguous()
    out = torch.empty(batch, 1, 2 * height, 2 * width, dtype=x.dtype)
    weight = conv.weight.detach().to(x.dtype).reshape(channels).numpy()
    bias = conv.bias.detach().to(x.dtype).numpy()
    _saliency_head_kernel(pixels.numpy(), weight, bias[0], out.numpy())
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _saliency_head_kernel(x, weight, bias, out):
    """x [B, h, w, C], weight [C] -> out [B, 1, 2h, 2w] (see saliency_head). The source
    coordinate of output pixel i is i * (h - 1) / (2h - 1) in float32, as PyTorch computes it
    for float32 maps, and the corner weights (1 - l, l)."""
    batch, height, width, channels = x.shape
    f = out.dtype.type
    plane = np.empty((height, width), dtype=x.dtype)
    rows, cols = out.shape[2], out.shape[3]
    scale_y = f(height - 1) / f(rows - 1) if rows > 1 else f(0.0)
    scale_x = f(width - 1) / f(cols - 1) if cols > 1 else f(0.0)
    x0 = np.empty(cols, dtype=np.int64)
    x1 = np.empty(cols, dtype=np.int64)
    lx = np.empty(cols, dtype=x.dtype)
    for j in range(cols):
        source = scale_x * f(j)
        x0[j] = min(int(source), width - 1)
        x1[j] = x0[j] + (1 if x0[j] < width - 1 else 0)
        lx[j] = source - f(x0[j])
    for b in range(batch):
        frame = x[b].reshape(-1, channels)
        flat = plane.ravel()
        for p in range(flat.shape[0]):
            total = bias
            for c in range(channels):
                total += weight[c] * frame[p, c]
            flat[p] = total
        for i in range(rows):
            source = scale_y * f(i)
            y0 = min(int(source), height - 1)
            y1 = y0 + (1 if y0 < height - 1 else 0)
            ly = source - f(y0)
            top, bottom, target = plane[y0], plane[y1], out[b, 0, i]
            for j in range(cols):
                a = (f(1.0) - lx[j]) * top[x0[j]] + lx[j] * top[x1[j]]
                c = (f(1.0) - lx[j]) * bottom[x0[j]] + lx[j] * bottom[x1[j]]
                target[j] = (f(1.0) - ly) * a + ly * c
            for j in range(cols):
                target[j] = sigmoid(target[j], f)[0]
