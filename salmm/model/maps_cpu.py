"""Per-map CPU kernels on channels-last maps, one numba call each, for inference and, with
their own backward, for training: GroupNorm (resized and through the GELU for inference), the
spatial attention bridge, the CLIP cross-attention (inference), and the saliency head.

``group_norm_gelu`` / ``group_norm_autograd``: what SalMM does after a block: its
``GroupNorm``, then (the encoder) ``F.max_pool2d(., 2, 2)`` or (the decoder) a 2x bilinear
upsampling, then (inference only) the GELU, written straight into the fusion convolution's
input when the decoder asks. PyTorch's channels-first GroupNorm needs the map copied to
channels-first memory and back (its channels-last kernel is far less accurate), and max-pool
computes indices nobody uses. Here the map is read where it lies: per (frame, group) the mean
and the biased variance come from the per-channel sums of x and x^2 in float64 (one pass, a
fixed order: no dependence on threads), then y = x * scale[c] + shift[c] with scale = rstd *
weight, shift = bias - mean * scale (the form PyTorch applies), and the 2x2 maximum of y (NaN
propagates) when pooling. The pooled backward finds each window's choice again (max-pool's:
the first maximum, or the last NaN), so only the pooled map is kept. At [8, 8, 256, 256] (the
encoder's first stage at batch 8), forward + backward: 15 ms, against 27 for the unpooled
kernel followed by PyTorch's max-pool and 52 for the modules.

``spatial_attention``: the bridge's [channel mean, channel max] planes, its dilated 7x7
two-channel convolution written out over whole rows (PyTorch runs it as a slow im2col), the
sigmoid, and the products the bridge makes of it, with the channel means its channel attention
needs; for training, its backward in one kernel too (some 15 operators and their backward per
map become one call each way: a third less time for the bridge in a training step). Its sums
are reassociated to vectorise (``fastmath={"reassoc"}``): a fixed order for a given build,
whatever the thread count.

``bridge``: the whole bridge for inference, the five maps in one call (the spatial attention
as above, the channel attention, the outputs written into the fusion convolutions' inputs):
0.9 ms at 256 x 256, where the modules take 2.9 and the training path's kernels 1.7.

``cross_attention``: the CLIP cross-attention on the deepest map, for inference.

``bridge_output``: the bridge's last step, s + a * m, with a one-kernel backward for training.

``saliency_head``: the final 1x1 convolution, the 2x bilinear upsampling (align_corners) and
the sigmoid, and their backward.

The modules' own forward and backward are the ``_ref`` twin (``tests/test_layer_cpu.py``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from salmm.model.numba_math import claim, sigmoid
from salmm.model.numba_math import gelu as gelu_of
from salmm.model.scan_cpu import run_jobs

__all__ = ["RESIZE", "bridge", "bridge_output", "cross_attention", "group_norm_autograd",
           "group_norm_gelu", "saliency_head", "spatial_attention"]


RESIZE = {None: 0, "pool": 1, "upsample": 2}
"""What :func:`group_norm_gelu` does between the normalisation and the GELU, as the kernel's
mode: nothing, a 2x2 max-pool, a 2x bilinear upsampling (align_corners)."""


def group_norm_gelu(norm: nn.GroupNorm, x: Tensor, resize: str | None = None,
                    into: Tensor | None = None) -> Tensor:
    """SalMM's step after a block, for inference: GELU(resize(``norm``(x))) on x
    [B, C, H, W] (CPU, float32 / float64, any memory format), ``resize`` None, "pool" (a 2x2
    max-pool: the encoder's) or "upsample" (``F.interpolate(., scale_factor=2,
    mode="bilinear", align_corners=True)``: the decoder's), the GELU exact
    (:func:`salmm.model.numba_math.gelu`) -> [B, C, H', W'] in x's dtype, written into
    ``into`` when given (any strides whose channels are adjacent: a channel slice of a fusion
    convolution's input) and returned as it, else into a new channels-last tensor. No
    autograd."""
    weight, bias = _affine(norm, x.dtype, x.shape[1])
    out, _, _ = _group_norm_forward(x, norm.num_groups, norm.eps, weight, bias, RESIZE[resize],
                                    True, into)
    return out


def _group_norm_forward(x: Tensor, groups: int, eps: float, weight: np.ndarray,
                        bias: np.ndarray, mode: int, gelu: bool, into: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, np.ndarray]:
    """(out [B, C, H', W'], ``into`` or a new channels-last tensor; the pixels [B, H, W, C]
    read; stats [2, B, groups] (mean, rstd)). ``mode``: :data:`RESIZE`'s."""
    batch, channels, height, width = x.shape
    pixels = x.detach().permute(0, 2, 3, 1).contiguous()  # a view for channels-last x
    if into is None:
        size = {0: (height, width), 1: (height // 2, width // 2), 2: (2 * height, 2 * width)}
        into = torch.empty(batch, *size[mode], channels, dtype=x.dtype).permute(0, 3, 1, 2)
    stats = np.empty((2, batch, groups))
    _group_norm_kernel(pixels.numpy(), groups, eps, weight, bias, mode, gelu,
                       into.permute(0, 2, 3, 1).numpy(), stats)
    return into, pixels, stats


def _affine(norm: nn.GroupNorm, dtype: torch.dtype, channels: int) -> tuple[np.ndarray, ...]:
    """A GroupNorm's weight and bias in ``dtype`` (ones and zeros when it has none)."""
    if norm.affine:
        return tuple(t.detach().to(dtype).numpy() for t in (norm.weight, norm.bias))
    return torch.ones(channels, dtype=dtype).numpy(), torch.zeros(channels, dtype=dtype).numpy()


def group_norm_autograd(norm: nn.GroupNorm, x: Tensor, pool: bool = False) -> Tensor:
    """``norm`` on x [B, C, H, W] (CPU, float32 / float64), then a 2x2 max-pool when ``pool``,
    for training: differentiable in x and the affine parameters, computed on channels-last
    memory where PyTorch copies to channels-first and back (forward and backward) ->
    [B, C, H', W'] channels-last. With the pool, the normalised map is never stored: the
    backward finds each window's choice again from x (which the convolution before keeps
    anyway) and the saved statistics."""
    return _GroupNorm.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, pool)


class _GroupNorm(torch.autograd.Function):
    """y = (x - mean_g) * rstd_g * weight_c + bias_c, then the 2x2 maximum if pooling;
    backward: with g = dL/dy (with the pool: the pooled gradient at each window's chosen
    pixel, 0 elsewhere, as max-pool's backward gives), gbias = sum g, gweight = sum g xhat,
    gx = rstd (g weight - mean_g(g weight) - xhat mean_g(g weight xhat)), every sum in float64;
    with the pool the sums run over the chosen pixels only."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, pool):
        w, b = weight.detach().to(x.dtype).numpy(), bias.detach().to(x.dtype).numpy()
        out, pixels, stats = _group_norm_forward(x, groups, eps, w, b,
                                                 RESIZE["pool" if pool else None], False)
        ctx.save_for_backward(pixels)
        ctx.stats, ctx.weight, ctx.bias = stats, w, b
        ctx.pool, ctx.dtypes = pool, (weight.dtype, bias.dtype)
        return out

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gout):
        (pixels,) = ctx.saved_tensors
        g = gout.permute(0, 2, 3, 1).contiguous().to(pixels.dtype)
        gx = torch.empty_like(pixels)
        channels = pixels.shape[-1]
        gweight, gbias = np.zeros(channels), np.zeros(channels)
        if ctx.pool:
            _group_norm_pool_backward_kernel(pixels.numpy(), g.numpy(), ctx.weight, ctx.bias,
                                             ctx.stats, gx.numpy(), gweight, gbias)
        else:
            _group_norm_backward_kernel(pixels.numpy(), g.numpy(), ctx.weight, ctx.stats,
                                        gx.numpy(), gweight, gbias)
        return (gx.permute(0, 3, 1, 2), torch.from_numpy(gweight).to(ctx.dtypes[0]),
                torch.from_numpy(gbias).to(ctx.dtypes[1]), None, None, None)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _backward_coefficients(stats, b, weight, count, sums, products, gweight, gbias, alpha, beta,
                           gamma):
    """From frame b's per-channel sums of g and g x (float64, [C]): gweight and gbias
    accumulated, and gx = alpha g - beta x + gamma per channel."""
    groups = stats.shape[2]
    per_group = sums.shape[0] // groups
    for group in range(groups):
        mean, rstd = stats[0, b, group], stats[1, b, group]
        mean_g, mean_gx = 0.0, 0.0
        for c in range(group * per_group, (group + 1) * per_group):
            # sum over the group of g * w and g * w * xhat (xhat = (x - mean) rstd)
            gbias[c] += sums[c]
            gweight[c] += (products[c] - mean * sums[c]) * rstd
            mean_g += sums[c] * weight[c]
            mean_gx += (products[c] - mean * sums[c]) * rstd * weight[c]
        mean_g /= count
        mean_gx /= count
        for c in range(group * per_group, (group + 1) * per_group):
            alpha[c] = rstd * weight[c]
            beta[c] = rstd * rstd * mean_gx
            gamma[c] = rstd * rstd * mean_gx * mean - rstd * mean_g


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _group_norm_backward_kernel(x, g, weight, stats, gx, gweight, gbias):
    """x, g (dL/dy), gx [B, H, W, C]; stats [2, B, groups] (mean, rstd); gweight, gbias [C]
    accumulated in float64."""
    batch, height, width, channels = x.shape
    count = height * width * (channels // stats.shape[2])
    sums, products = np.empty(channels), np.empty(channels)
    alpha, beta, gamma = np.empty(channels), np.empty(channels), np.empty(channels)
    for b in range(batch):
        frame, grad, into = (x[b].reshape(-1, channels), g[b].reshape(-1, channels),
                             gx[b].reshape(-1, channels))
        _channel_sums(grad.ravel(), sums, frame.ravel(), products)
        _backward_coefficients(stats, b, weight, count, sums, products, gweight, gbias, alpha,
                               beta, gamma)
        for p in range(frame.shape[0]):
            for c in range(channels):
                into[p, c] = alpha[c] * grad[p, c] - beta[c] * frame[p, c] + gamma[c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _group_norm_pool_backward_kernel(x, g, weight, bias, stats, gx, gweight, gbias):
    """x, gx [B, H, W, C]; g (dL/d pooled) [B, H // 2, W // 2, C]; the rest as
    :func:`_group_norm_backward_kernel`. Each window's choice is found again as the forward
    made it (:func:`_scale_shift`, :func:`_window_choice`); dL/dy is g at the chosen pixels and
    0 elsewhere, so the sums run over the pooled map, and gx is - beta x + gamma at every pixel
    (a row or column of an odd-sized map that no window covers included) with alpha g then
    added at the chosen ones."""
    batch, height, width, channels = x.shape
    count = height * width * (channels // stats.shape[2])
    sums, products = np.empty(channels), np.empty(channels)
    alpha, beta, gamma = np.empty(channels), np.empty(channels), np.empty(channels)
    scale, shift = np.empty(channels, dtype=x.dtype), np.empty(channels, dtype=x.dtype)
    chosen = np.empty(g.shape[1:], dtype=np.uint8)
    picked = np.empty(g.shape[1:], dtype=x.dtype)
    tiled_beta, tiled_gamma = np.empty(width * channels), np.empty(width * channels)
    for b in range(batch):
        _scale_shift(stats, b, weight, bias, scale, shift)
        for oy in range(g.shape[1]):
            top, bottom, choice, value = x[b, 2 * oy], x[b, 2 * oy + 1], chosen[oy], picked[oy]
            for ox in range(g.shape[2]):
                for c in range(channels):
                    choice[ox, c], value[ox, c] = _window_choice(
                        top[2 * ox, c], top[2 * ox + 1, c], bottom[2 * ox, c],
                        bottom[2 * ox + 1, c], scale[c], shift[c])
        _channel_sums(g[b].ravel(), sums, picked.ravel(), products)
        _backward_coefficients(stats, b, weight, count, sums, products, gweight, gbias, alpha,
                               beta, gamma)
        # - beta x + gamma at every pixel a row at a time, the coefficients tiled along it (a
        # long loop vectorises; one over a pixel's few channels does not), then alpha g added
        # at each window's chosen pixel
        for j in range(width * channels):
            tiled_beta[j], tiled_gamma[j] = beta[j % channels], gamma[j % channels]
        for py in range(height):
            source, target = x[b, py].ravel(), gx[b, py].ravel()
            for j in range(source.shape[0]):
                target[j] = tiled_gamma[j] - tiled_beta[j] * source[j]
            if py % 2 == 0 or py >= 2 * g.shape[1]:
                continue
            oy = py // 2
            for ox in range(g.shape[2]):
                for c in range(channels):
                    k = chosen[oy, ox, c]
                    gx[b, 2 * oy + (k >> 1), 2 * ox + (k & 1), c] += alpha[c] * g[b, oy, ox, c]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _window_choice(p, q, r, s, scale, shift):
    """(which of a 2x2 window's pixels max-pool takes after the normalisation
    y = v * scale + shift, 0..3: top-left, top-right, bottom-left, bottom-right; that pixel's
    v): the first maximum, or the last NaN. The maximum as the forward takes it, then the
    first pixel equal to it, with selects, not branches (so the loop vectorises:
    data-dependent branches cost 20x here)."""
    yp, yq, yr, ys = p * scale + shift, q * scale + shift, r * scale + shift, s * scale + shift
    best = yp
    for v in (yq, yr, ys):
        best = v if v > best or np.isnan(v) else best
    if np.isnan(best):
        k = 3 if np.isnan(ys) else (2 if np.isnan(yr) else (1 if np.isnan(yq) else 0))
    else:
        k = np.int64(yp != best) * (1 + np.int64(yq != best) * (1 + np.int64(yr != best)))
    top = p if k == 0 else q
    bottom = r if k == 2 else s
    return k, top if k < 2 else bottom


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _channel_sums(a, sums, v=None, products=None):
    """sums[c] = sum of a and, unless v is None, products[c] = sum of a * v over the pixels of
    flat channels-last rows a, v [P * C], in float64. Over 16 pixels at a time, each lane its own partial sum
    (a loop that long vectorises; one over the C channels does not), the partial sums added in
    pixel order at the end: a fixed order, whatever the thread count."""
    channels = sums.shape[0]
    width = 16 * channels
    first, second = np.zeros(width), np.zeros(width)
    blocks = a.shape[0] // width
    for i in range(blocks):
        block_a = a[i * width:(i + 1) * width]
        if v is None:  # (branches numba prunes when v is None)
            for j in range(width):
                first[j] += np.float64(block_a[j])
        else:
            block_v = v[i * width:(i + 1) * width]
            for j in range(width):
                x = np.float64(block_a[j])
                first[j] += x
                second[j] += x * block_v[j]
    for j in range(a.shape[0] - blocks * width):
        x = np.float64(a[blocks * width + j])
        first[j] += x
        if v is not None:
            second[j] += x * v[blocks * width + j]
    sums[:] = 0.0
    for j in range(width):
        sums[j % channels] += first[j]
    if products is not None:
        products[:] = 0.0
        for j in range(width):
            products[j % channels] += second[j]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _scale_shift(stats, b, weight, bias, scale, shift):
    """Frame b's y = x * scale[c] + shift[c] from its groups' (mean, rstd) in stats."""
    groups = stats.shape[2]
    per_group = scale.shape[0] // groups
    for g in range(groups):
        mean, rstd = stats[0, b, g], stats[1, b, g]
        for c in range(g * per_group, (g + 1) * per_group):
            scale[c] = rstd * weight[c]
            shift[c] = bias[c] - mean * rstd * weight[c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _group_norm_kernel(x, groups, eps, weight, bias, mode, gelu, out, stats):
    """x [B, H, W, C] -> out [B, H', W', C] (any strides whose channels are adjacent): the
    normalisation (the module docstring), resized by ``mode`` (:data:`RESIZE`), through the
    GELU if ``gelu``; stats [2, B, groups] receives each group's mean and rstd. Each output
    row is made in a flat buffer (loops over a whole row vectorise; one over a pixel's few
    channels does not), then stored."""
    batch, height, width, channels = x.shape
    per_group = channels // groups
    count = height * width * per_group
    sums = np.empty(channels, dtype=np.float64)
    squares = np.empty(channels, dtype=np.float64)
    scale = np.empty(channels, dtype=x.dtype)
    shift = np.empty(channels, dtype=x.dtype)
    row = np.empty(out.shape[2] * channels, dtype=x.dtype)
    tiled_scale = np.empty(width * channels, dtype=x.dtype)
    tiled_shift = np.empty(width * channels, dtype=x.dtype)
    for b in range(batch):
        frame = x[b].reshape(height * width, channels)
        _channel_sums(frame.ravel(), sums, frame.ravel(), squares)
        for g in range(groups):
            total, total2 = 0.0, 0.0
            for c in range(g * per_group, (g + 1) * per_group):
                total += sums[c]
                total2 += squares[c]
            mean = total / count
            rstd = 1.0 / np.sqrt(max(total2 / count - mean * mean, 0.0) + eps)
            stats[0, b, g], stats[1, b, g] = mean, rstd
        _scale_shift(stats, b, weight, bias, scale, shift)
        for j in range(width * channels):
            tiled_scale[j], tiled_shift[j] = scale[j % channels], shift[j % channels]
        if mode == 2:
            _upsampled_rows(x[b], tiled_scale, tiled_shift, gelu, row, out[b])
            continue
        for oy in range(out.shape[1]):
            if mode == 0:
                source = x[b, oy].ravel()
                for j in range(row.shape[0]):
                    row[j] = source[j] * tiled_scale[j] + tiled_shift[j]
            else:
                _pooled_row(x[b, 2 * oy], x[b, 2 * oy + 1], scale, shift, row)
            _store_row(row, gelu, out[b, oy])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _pooled_row(top, bottom, scale, shift, row):
    """row [W' C] = the 2x2 maxima (NaN propagates) of two rows [W, C] normalised
    (y = v * scale[c] + shift[c])."""
    channels = top.shape[1]
    for ox in range(row.shape[0] // channels):
        for c in range(channels):
            best = top[2 * ox, c] * scale[c] + shift[c]
            for v in (top[2 * ox + 1, c] * scale[c] + shift[c],
                      bottom[2 * ox, c] * scale[c] + shift[c],
                      bottom[2 * ox + 1, c] * scale[c] + shift[c]):
                best = v if v > best or np.isnan(v) else best
            row[ox * channels + c] = best


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _store_row(row, gelu, target):
    """target [W', C] (any strides, channels adjacent) = row [W' C], through the GELU if
    asked."""
    if gelu:
        for j in range(row.shape[0]):
            row[j] = gelu_of(row[j])
    channels = target.shape[1]
    for ox in range(target.shape[0]):
        for c in range(channels):
            target[ox, c] = row[ox * channels + c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _upsampled_rows(frame, tiled_scale, tiled_shift, gelu, row, target):
    """target [2H, 2W, C] = the normalised frame [H, W, C] (y = v * tiled_scale + tiled_shift
    along a flat row) upsampled 2x, bilinear with align_corners (:func:`_upsample_taps`, as
    PyTorch: each row interpolated along x, then the two rows along y), through the GELU if
    asked; row: a buffer [2W C]."""
    height, width, channels = frame.shape
    f = row.dtype.type
    y0, y1, ly = _upsample_taps(height, target.shape[0], f)
    x0, x1, lx = _upsample_taps(width, target.shape[1], f)
    across = np.empty((height, row.shape[0]), dtype=row.dtype)
    normed = np.empty(width * channels, dtype=row.dtype)
    for y in range(height):
        source = frame[y].ravel()
        for j in range(normed.shape[0]):
            normed[j] = source[j] * tiled_scale[j] + tiled_shift[j]
        _lerp_along_x(normed, x0, x1, lx, channels, across[y])
    for oy in range(target.shape[0]):
        _lerp_rows(across[y0[oy]], across[y1[oy]], ly[oy], row)
        _store_row(row, gelu, target[oy])


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _lerp_along_x(source, x0, x1, lx, channels, into):
    """One row of a bilinear upsampling along x: into [W' C] from source [W C] (flat rows of
    ``channels`` channels), output pixel ox = (1 - lx) source[x0] + lx source[x1]
    (:func:`_upsample_taps`' taps)."""
    f = into.dtype.type
    for ox in range(x0.shape[0]):
        left, right, share = x0[ox] * channels, x1[ox] * channels, lx[ox]
        for c in range(channels):
            into[ox * channels + c] = ((f(1.0) - share) * source[left + c]
                                       + share * source[right + c])


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _lerp_rows(top, bottom, share, row):
    """The upsampling along y: row = (1 - share) top + share bottom, whole flat rows."""
    f = row.dtype.type
    for j in range(row.shape[0]):
        row[j] = (f(1.0) - share) * top[j] + share * bottom[j]


def spatial_attention(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SalMM's spatial attention bridge on one map x [B, C, H, W] (CPU, channels-last or not):
    a = sigmoid(conv([channel mean, channel max])) with ``conv`` the shared dilated 2 -> 1
    convolution, then (s, mixed, pooled) = (a * x, a * x + x, the channel means of mixed
    [B, C]); s and mixed [B, C, H, W] in channels-last memory. Differentiable in x and the
    convolution's weight and bias when autograd records (training)."""
    record = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, conv.weight, conv.bias))
    return _SpatialAttention.apply(x, conv.weight, conv.bias, *_gate_geometry(conv), record)


def _gate_geometry(conv: nn.Conv2d) -> tuple[int, int]:
    """(dilation, padding) of the bridge's convolution, which the kernels take as the model
    has it: 2 -> 1 channels, 7 x 7, stride 1, the output the map's size."""
    (dilation, other), (padding, across) = conv.dilation, conv.padding
    if (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) != (
            2, 1, (7, 7), (1, 1)) or dilation != other or padding != across \
            or 2 * padding != 6 * dilation:
        raise ValueError(f"the spatial attention kernels take a 2 -> 1, 7x7 convolution whose "
                         f"output is its input's size, not {conv}")
    return dilation, padding


def bridge(conv: nn.Conv2d, attention: nn.Module, maps: list[Tensor],
           fusion: list[Tensor] | None = None) -> list[Tensor]:
    """SalMM's whole attention bridge (``SCAttBridge``) for inference, in one kernel call: the
    maps [B, C_i, H_i, W_i] (CPU, float32 / float64, any memory format) -> a_i * m_i + s_i
    with s_i = g_i * x_i and m_i = s_i + x_i, g_i [B, 1, H_i, W_i] the spatial attention
    (``conv``: its shared 2 -> 1 convolution) and a_i [B, C_i] the channel attention
    (``attention``: the ``ChannelAttBridge``, whose ``get_all_att`` mixes the maps' channel
    means of m_i and whose ``att1..`` heads turn them into sigmoid weights). With ``fusion``
    (channels-last tensors [B, K_i + C_i, H_i, W_i]: the fusion convolutions' inputs) the
    results are written into their last C_i channels and returned as views of them; else
    into new channels-last tensors. No autograd. The frames of the batch are claimed by up
    to ``torch.get_num_threads()`` threads."""
    dtype = maps[0].dtype
    pixels = tuple(t.permute(0, 2, 3, 1).contiguous().numpy() for t in maps)
    if fusion is None:
        fusion = [torch.empty(p.shape, dtype=dtype).permute(0, 3, 1, 2) for p in pixels]
    elif not all(f.is_contiguous(memory_format=torch.channels_last) and f.dtype == dtype
                 for f in fusion):
        raise ValueError("the bridge writes into channels-last tensors of its maps' dtype")
    heads = [getattr(attention, f"att{i + 1}") for i in range(len(maps))]
    with torch.no_grad():  # (copies on every call: no update to the weights goes unseen)
        heads_w = torch.cat([h.weight for h in heads]).to(dtype)  # [sum C_i, sum C_i]
        heads_b = torch.cat([h.bias for h in heads]).to(dtype)
    weight, bias, mix = (t.detach().to(dtype).numpy() for t in (
        conv.weight, conv.bias, attention.get_all_att.weight))
    run_jobs(_bridge_kernel, (pixels, tuple(f.permute(0, 2, 3, 1).numpy() for f in fusion),
                              weight, bias, *_gate_geometry(conv), mix,
                              attention.get_all_att.padding[0], heads_w.numpy(),
                              heads_b.numpy()), maps[0].shape[0])
    return [f.narrow(1, f.shape[1] - t.shape[1], t.shape[1]) for f, t in zip(fusion, maps)]


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _bridge_kernel(maps, outs, weight, bias, dilation, padding, mix, mix_padding, heads_w,
                   heads_b, counter):
    """Frames claimed from ``counter``: maps (a tuple of [B, H_i, W_i, C_i]) -> the last C_i
    channels of outs ([B, H_i, W_i, K_i + C_i]); weight [1, 2, 7, 7], bias [1] and mix
    [1, 1, taps]: the convolutions' own; see :func:`bridge`. Per frame: each
    map's gate (:func:`_gate_map`, kept) and the channel means of m (float64 sums, in
    :func:`_channel_sums`' order, rounded to the map's type); the channel attention from all
    of them (its sums in float64); then every output pixel."""
    dtype = heads_b.dtype
    f = dtype.type
    total = heads_b.shape[0]
    gates = [np.empty(m.shape[1:3], dtype=dtype) for m in maps]
    largest = 0
    for m in maps:
        largest = max(largest, m.shape[1] * m.shape[2] * m.shape[3])
    both = np.empty(largest, dtype=dtype)
    sums = np.empty(total)
    pooled, mixed = np.empty(total, dtype=dtype), np.empty(total, dtype=dtype)
    att = np.empty(total, dtype=dtype)
    frame = claim(counter)
    while frame < maps[0].shape[0]:
        row = 0
        for i in range(len(maps)):
            height, width, channels = maps[i].shape[1:]
            pixels = maps[i][frame].reshape(-1, channels)
            planes = np.empty((2, height, width), dtype=dtype)
            _channel_planes(pixels, planes[0].ravel(), planes[1].ravel())
            _gate_map(planes, weight[0], bias[0], dilation, padding, gates[i])
            gate, m = gates[i].ravel(), both[:pixels.size].reshape(-1, channels)
            for p in range(gate.shape[0]):
                for c in range(channels):
                    m[p, c] = gate[p] * pixels[p, c] + pixels[p, c]
            _channel_sums(m.ravel(), sums[:channels])
            for c in range(channels):
                pooled[row + c] = sums[c] / (height * width)
            row += channels
        taps = mix.shape[2]
        for j in range(total):  # get_all_att: a 1-channel convolution along the channels
            value = 0.0
            for k in range(taps):
                source = j + k - mix_padding
                if 0 <= source < total:
                    value += np.float64(mix[0, 0, k]) * pooled[source]
            mixed[j] = f(value)
        for o in range(total):  # the heads, then their sigmoid
            value = np.float64(heads_b[o])
            for j in range(total):
                value += np.float64(heads_w[o, j]) * mixed[j]
            att[o] = sigmoid(f(value), f)[0]
        row = 0
        for i in range(len(maps)):
            channels = maps[i].shape[3]
            first = outs[i].shape[3] - channels
            source, target, gate = maps[i][frame], outs[i][frame], gates[i]
            for y in range(source.shape[0]):
                for x in range(source.shape[1]):
                    g = gate[y, x]
                    for c in range(channels):
                        s = g * source[y, x, c]
                        target[y, x, first + c] = s + att[row + c] * (s + source[y, x, c])
            row += channels
        frame = claim(counter)


class _SpatialAttention(torch.autograd.Function):
    """Forward: :func:`_spatial_attention_kernel`. Backward, with gm = dL/dmixed + dL/dpooled /
    (H W): dL/dx = (a + 1) gm + a gs + the planes' share, dL/da = sum_c x (gm + gs), through
    the sigmoid and the convolution (its weight gradient summed per map row in the map's type,
    the rows in float64; its bias gradient in float64); the
    channel mean passes 1 / C of its gradient to every channel, the channel max all of it to
    the channels that hold the maximum, split evenly among ties (as torch's amax does)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dilation, padding, keep):
        batch, channels, height, width = x.shape
        pixels = x.detach().permute(0, 2, 3, 1).contiguous()
        s, mixed = torch.empty_like(pixels), torch.empty_like(pixels)
        pooled = torch.empty(batch, channels, dtype=x.dtype)
        gates = torch.empty(batch, height, width, dtype=x.dtype)
        planes = torch.empty(batch, 2, height, width, dtype=x.dtype)
        w = weight.detach().to(x.dtype)[0].contiguous()  # [2, k, k]
        b = bias.detach().to(x.dtype)
        _spatial_attention_kernel(pixels.numpy(), w.numpy(), b.numpy()[0], dilation, padding,
                                  s.numpy(), mixed.numpy(), pooled.numpy(), gates.numpy(),
                                  planes.numpy())
        if keep:
            ctx.save_for_backward(pixels, gates, planes, w)
            ctx.conv = (dilation, padding, weight.dtype, weight.shape, bias.dtype)
        return s.permute(0, 3, 1, 2), mixed.permute(0, 3, 1, 2), pooled

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gs, gmixed, gpooled):
        pixels, gates, planes, w = ctx.saved_tensors
        dilation, padding, w_dtype, w_shape, b_dtype = ctx.conv
        dtype = pixels.dtype

        def channels_last(g):  # [B, C, H, W] gradient -> [B, H, W, C] array (zeros if unused)
            if g is None:
                return np.zeros(pixels.shape, dtype=pixels.numpy().dtype)
            return g.permute(0, 2, 3, 1).contiguous().to(dtype).numpy()

        gp = (np.zeros((pixels.shape[0], pixels.shape[3]), dtype=pixels.numpy().dtype)
              if gpooled is None
              else gpooled.contiguous().to(dtype).numpy())
        gx = torch.empty_like(pixels)
        gweight = np.zeros(w.shape)
        gbias = np.zeros(1)
        _spatial_attention_backward_kernel(pixels.numpy(), gates.numpy(), planes.numpy(),
                                           w.numpy(), dilation, padding, channels_last(gs),
                                           channels_last(gmixed), gp, gx.numpy(), gweight,
                                           gbias)
        return (gx.permute(0, 3, 1, 2), torch.from_numpy(gweight).reshape(w_shape).to(w_dtype),
                torch.from_numpy(gbias).to(b_dtype), None, None, None)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _taps(taps, dilation, padding, height, width):
    """The taps of a ``taps`` x ``taps`` convolution (``dilation``, zero ``padding``) that reach
    into an H x W map, as rows (ky, kx, dy, dx, x0, x1): tap (ky, kx) reads the input at
    (y + dy, x + dx) for the output columns x0 <= x < x1."""
    rows = np.empty((taps * taps, 6), dtype=np.int64)
    count = 0
    for ky in range(taps):
        for kx in range(taps):
            dy, dx = ky * dilation - padding, kx * dilation - padding
            x0, x1 = max(0, -dx), min(width, width - dx)
            if x1 > x0:  # (a negative slice end would count from the end)
                rows[count] = (ky, kx, dy, dx, x0, x1)
                count += 1
    return rows[:count]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _channel_planes(frame, means, maxima):
    """Each pixel's channel mean and maximum (NaN propagates): frame [P, C] -> means, maxima
    [P]."""
    f = frame.dtype.type
    channels = frame.shape[1]
    for p in range(means.shape[0]):
        total, best = f(0.0), frame[p, 0]
        for c in range(channels):
            v = frame[p, c]
            total += v
            best = v if v > best or np.isnan(v) else best
        means[p] = total / f(channels)
        maxima[p] = best


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _gate_map(planes, weight, bias, dilation, padding, gates):
    """gates [H, W] = sigmoid(bias + the 7 x 7 convolution of planes [2, H, W] by weight
    [2, 7, 7] with ``dilation`` and zero ``padding`` (2 padding = 6 dilation: the output is
    the map's size)). The planes are copied into a zero border once; then per output row, per
    plane and kernel row, the row's seven taps are one pass over shifted slices of the source
    row (14 passes a row, with no bounds to check, where a pass per tap and edge took 98)."""
    height, width = gates.shape
    f = gates.dtype.type
    d = dilation
    padded = np.zeros((2, height + 2 * padding, width + 2 * padding), dtype=gates.dtype)
    for plane in range(2):
        for y in range(height):
            padded[plane, y + padding, padding:padding + width] = planes[plane, y]
    for y in range(height):
        row = gates[y]
        row[:] = bias
        for plane in range(2):
            for ky in range(7):
                source, w = padded[plane, y + ky * d], weight[plane, ky]
                s0, s1, s2 = source[0:width], source[d:d + width], source[2 * d:2 * d + width]
                s3, s4 = source[3 * d:3 * d + width], source[4 * d:4 * d + width]
                s5, s6 = source[5 * d:5 * d + width], source[6 * d:6 * d + width]
                w0, w1, w2, w3, w4, w5, w6 = w[0], w[1], w[2], w[3], w[4], w[5], w[6]
                for i in range(width):
                    row[i] += (w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i]
                               + w4 * s4[i] + w5 * s5[i] + w6 * s6[i])
        for i in range(width):
            row[i] = sigmoid(row[i], f)[0]


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _spatial_attention_kernel(x, weight, bias, dilation, padding, s, mixed, pooled, gates,
                              planes):
    """x, s, mixed [B, H, W, C]; weight [2, 7, 7]; pooled [B, C]; gates [B, H, W] (a);
    planes [B, 2, H, W] (channel mean, channel max); see spatial_attention."""
    batch, height, width, channels = x.shape
    sums = np.empty(channels)
    for b in range(batch):
        frame = x[b].reshape(-1, channels)
        _channel_planes(frame, planes[b, 0].ravel(), planes[b, 1].ravel())
        _gate_map(planes[b], weight, bias, dilation, padding, gates[b])
        flat = gates[b].ravel()
        weighted, both = s[b].reshape(-1, channels), mixed[b].reshape(-1, channels)
        for p in range(flat.shape[0]):
            for c in range(channels):
                v = frame[p, c]
                weighted[p, c] = flat[p] * v
                both[p, c] = flat[p] * v + v
        _channel_sums(both.ravel(), sums)
        for c in range(channels):
            pooled[b, c] = sums[c] / (height * width)


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _spatial_attention_backward_kernel(x, gates, planes, weight, dilation, padding, gs, gmixed,
                                       gpooled, gx, gweight, gbias):
    """x, gs, gmixed, gx [B, H, W, C]; gates [B, H, W]; planes [B, 2, H, W]; weight [2, k, k];
    gpooled [B, C]; gweight [2, k, k] and gbias [1] accumulated in float64 over rows (see
    _SpatialAttention)."""
    batch, height, width, channels = x.shape
    f = x.dtype.type
    reach = _taps(weight.shape[1], dilation, padding, height, width)
    glogit = np.empty((height, width), dtype=x.dtype)
    gplanes = np.empty((2, height, width), dtype=x.dtype)
    totals = np.empty((2, reach.shape[0]))  # each tap's weight gradient, rows in order
    gm = np.empty(channels, dtype=x.dtype)
    for b in range(batch):
        frame, grad_s, grad_m, into = (x[b].reshape(-1, channels), gs[b].reshape(-1, channels),
                                       gmixed[b].reshape(-1, channels),
                                       gx[b].reshape(-1, channels))
        a, gl = gates[b].ravel(), glogit.ravel()
        share = gpooled[b] / f(height * width)
        bias_total = 0.0
        for p in range(a.shape[0]):
            total = f(0.0)
            for c in range(channels):
                gm[c] = grad_m[p, c] + share[c]
                total += frame[p, c] * (gm[c] + grad_s[p, c])
                into[p, c] = (a[p] + f(1.0)) * gm[c] + a[p] * grad_s[p, c]
            gl[p] = total * a[p] * (f(1.0) - a[p])           # through the sigmoid
            bias_total += np.float64(gl[p])
        gbias[0] += bias_total
        gplanes[:] = 0.0
        totals[:] = 0.0
        for q in range(height):  # a row of the planes at a time, all its taps (it stays in L1)
            for plane in range(2):
                for tap in range(reach.shape[0]):
                    ky, kx, dy, dx, x0, x1 = reach[tap]
                    py = q - dy
                    if not 0 <= py < height:
                        continue
                    w = weight[plane, ky, kx]
                    source = glogit[py, x0:x1]
                    seen = planes[b, plane, q, x0 + dx:x1 + dx]
                    into_plane = gplanes[plane, q, x0 + dx:x1 + dx]
                    row = f(0.0)  # a row's sum in the map's type, the rows' in float64
                    for i in range(source.shape[0]):
                        into_plane[i] += w * source[i]
                        row += source[i] * seen[i]
                    totals[plane, tap] += np.float64(row)
        for plane in range(2):
            for tap in range(reach.shape[0]):
                gweight[plane, reach[tap, 0], reach[tap, 1]] += totals[plane, tap]
        mean_share, max_share = gplanes[0].ravel(), gplanes[1].ravel()
        maxima = planes[b, 1].ravel()
        for p in range(a.shape[0]):  # selects, not branches: the loops vectorise
            ties = 0
            for c in range(channels):
                ties += np.int64(frame[p, c] == maxima[p])
            per_tie, per_channel = max_share[p] / f(max(ties, 1)), mean_share[p] / f(channels)
            for c in range(channels):
                into[p, c] += per_channel + (per_tie if frame[p, c] == maxima[p] else f(0.0))


def cross_attention(attention: nn.Module, emb: Tensor, feature: Tensor) -> Tensor:
    """SalMM's ``CrossModelAtt`` for inference in one kernel call: with the embedding emb
    [B, E] viewed as q [B, C, E / C] and P = q q^T [B, C, C], out = gamma ((max_j P_ij - P_ij)
    @ v) + feature, v = the feature map [B, C, h, w] (CPU, float32 / float64, any memory
    format) as [B, C, h w] -> [B, C, h, w] channels-last, the feature's dtype (the module's
    bmm products rounded to it; their sums in float64). No autograd."""
    batch, channels, height, width = feature.shape
    dtype = feature.dtype
    pixels = feature.permute(0, 2, 3, 1).contiguous()  # a view for channels-last maps
    q = emb.detach().to(dtype).reshape(batch, channels, -1).contiguous()
    out = torch.empty_like(pixels)
    _cross_attention_kernel(q.numpy(), pixels.numpy().reshape(batch, -1, channels),
                            attention.gamma.detach().to(dtype).numpy(),
                            out.numpy().reshape(batch, -1, channels))
    return out.permute(0, 3, 1, 2)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _cross_attention_kernel(q, v, gamma, out):
    """q [B, C, K]; v, out [B, P, C] (pixels, channels innermost); gamma [1]. Every sum runs
    over its terms in order into float64 accumulators, one per output channel, so the loops
    run across the channels and vectorise without reordering a sum."""
    batch, channels, length = q.shape
    f = out.dtype.type
    across = np.empty((length, channels))  # q transposed, in float64
    perception = np.empty((channels, channels), dtype=out.dtype)  # [j, i]: P_ij, transposed
    total = np.empty(channels)
    for b in range(batch):
        for i in range(channels):
            for k in range(length):
                across[k, i] = q[b, i, k]
        for i in range(channels):
            total[:] = 0.0
            for k in range(length):
                qi, row = across[k, i], across[k]
                for j in range(channels):
                    total[j] += qi * row[j]
            best = f(total[0])
            for j in range(channels):  # the row's maximum (NaN propagates, as amax)
                value = f(total[j])
                best = value if value > best or np.isnan(value) else best
            for j in range(channels):
                perception[j, i] = best - f(total[j])
        for p in range(v.shape[1]):
            pixel, target = v[b, p], out[b, p]
            total[:] = 0.0
            for j in range(channels):
                vj, row = np.float64(pixel[j]), perception[j]
                for i in range(channels):
                    total[i] += row[i] * vj
            for i in range(channels):
                target[i] = gamma[0] * f(total[i]) + pixel[i]


def bridge_output(s: Tensor, a: Tensor, m: Tensor) -> Tensor:
    """The bridge's last step, s + a * m (``torch.addcmul``) with s, m [B, C, H, W] (the
    spatial-attended map and the mixed map, channels-last) and a [B, C, 1, 1] (the channel
    attention); under autograd, its backward is one kernel: dL/ds (the incoming gradient in
    dense channels-last memory, whatever its strides: it usually arrives as a channel slice of
    the fusion convolution's input gradient), dL/dm = dL/dout * a and dL/da = the sum over the
    map of dL/dout * m (in float64) in one pass, where PyTorch's addcmul backward makes two
    products and a sum, and the spatial attention's backward a copy."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (s, a, m)):
        return _BridgeOutput.apply(s, a, m)
    return torch.addcmul(s, a, m)


class _BridgeOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, a, m):
        ctx.save_for_backward(a, m)
        return torch.addcmul(s, a, m)

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gout):
        a, m = ctx.saved_tensors
        mixed = m.permute(0, 2, 3, 1).contiguous()  # a view for channels-last m
        g = gout.permute(0, 2, 3, 1).to(mixed.dtype)
        if g.stride(3) != 1:  # the kernel reads any strides whose channels are adjacent
            g = g.contiguous()
        gs, gm = torch.empty_like(mixed), torch.empty_like(mixed)
        ga = np.zeros(a.shape[:2])
        _bridge_output_backward_kernel(g.numpy(), a.detach().reshape(a.shape[:2]).to(
            mixed.dtype).numpy(), mixed.numpy(), gs.numpy(), gm.numpy(), ga)
        return (gs.permute(0, 3, 1, 2), torch.from_numpy(ga).to(a.dtype).reshape(a.shape),
                gm.permute(0, 3, 1, 2))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _bridge_output_backward_kernel(g, a, m, gs, gm, ga):
    """g (dL/dout, any strides), m, gs, gm [B, H, W, C]; a [B, C]; ga [B, C] (float64): gs = g,
    gm = g * a, ga = the sum of g * m over the pixels (:func:`_channel_sums`' order)."""
    batch, height, width, channels = g.shape
    sums = np.empty(channels)
    tiled = np.empty(width * channels, dtype=gm.dtype)
    for b in range(batch):
        for j in range(width * channels):
            tiled[j] = a[b, j % channels]
        for y in range(height):
            source, dense = g[b, y], gs[b, y]
            for x in range(width):
                for c in range(channels):
                    dense[x, c] = source[x, c]
            row, into = dense.ravel(), gm[b, y].ravel()
            for j in range(row.shape[0]):  # the whole row: a long loop that vectorises
                into[j] = row[j] * tiled[j]
        _channel_sums(gs[b].ravel(), sums, m[b].ravel(), ga[b])


def saliency_head(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """SalMM's last step on x [B, C, h, w] (CPU, any memory format): sigmoid of the 2x bilinear
    upsampling (align_corners=True) of the 1x1 convolution ``conv`` (C -> 1) -> [B, 1, 2h, 2w]
    in x's dtype, in (0, 1). Differentiable in x and the convolution's parameters (its
    backward is one numba kernel too)."""
    return _SaliencyHead.apply(x, conv.weight, conv.bias)


class _SaliencyHead(torch.autograd.Function):
    """Forward: :func:`_saliency_head_kernel`. Backward: through the sigmoid (g (1 - y) y, as
    torch's), the upsampling's adjoint (each output pixel's gradient back to its four source
    pixels with the same weights, rows then columns), and the 1x1 convolution (its weight and
    bias gradients summed in float64)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        batch, channels, height, width = x.shape
        pixels = x.detach().permute(0, 2, 3, 1).contiguous()
        out = torch.empty(batch, 1, 2 * height, 2 * width, dtype=x.dtype)
        w = weight.detach().to(x.dtype).reshape(channels)
        _saliency_head_kernel(pixels.numpy(), w.numpy(), bias.detach().to(x.dtype).numpy()[0],
                              out.numpy())
        ctx.save_for_backward(pixels, w, out)
        ctx.dtypes = (weight.dtype, weight.shape, bias.dtype)
        return out

    @staticmethod
    @once_differentiable  # the backward is numba: a second derivative must raise, not be 0
    def backward(ctx, gout):
        pixels, w, out = ctx.saved_tensors
        w_dtype, w_shape, b_dtype = ctx.dtypes
        gx = torch.empty_like(pixels)
        gweight, gbias = np.zeros(w.shape[0]), np.zeros(1)
        _saliency_head_backward_kernel(pixels.numpy(), w.numpy(), out.numpy(),
                                       gout.contiguous().to(out.dtype).numpy(), gx.numpy(),
                                       gweight, gbias)
        return (gx.permute(0, 3, 1, 2), torch.from_numpy(gweight).reshape(w_shape).to(w_dtype),
                torch.from_numpy(gbias).to(b_dtype))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _upsample_taps(size, out_size, f):
    """Bilinear 2x upsampling (align_corners=True) along one axis: for each of ``out_size``
    output pixels the source pixels (i0, i1) and the weight l of i1 (1 - l of i0), the source
    coordinate i * (size - 1) / (out_size - 1) in the map's dtype ``f``, as PyTorch computes it."""
    scale = f(size - 1) / f(out_size - 1) if out_size > 1 else f(0.0)
    i0, i1 = np.empty(out_size, dtype=np.int64), np.empty(out_size, dtype=np.int64)
    weight = np.empty(out_size, dtype=f)
    for j in range(out_size):
        source = scale * f(j)
        i0[j] = min(int(source), size - 1)
        i1[j] = i0[j] + (1 if i0[j] < size - 1 else 0)
        weight[j] = source - f(i0[j])
    return i0, i1, weight


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _saliency_head_backward_kernel(x, weight, out, gout, gx, gweight, gbias):
    """x, gx [B, h, w, C]; weight [C]; out (the sigmoid), gout [B, 1, 2h, 2w]; gweight [C],
    gbias [1] accumulated in float64."""
    batch, height, width, channels = x.shape
    f = out.dtype.type
    rows, cols = out.shape[2], out.shape[3]
    y0, y1, ly = _upsample_taps(height, rows, f)
    x0, x1, lx = _upsample_taps(width, cols, f)
    plane = np.empty((height, width), dtype=x.dtype)  # dL/d(the convolution's output)
    line = np.empty(width, dtype=x.dtype)
    for b in range(batch):
        plane[:] = 0.0
        for i in range(rows):
            y, g = out[b, 0, i], gout[b, 0, i]
            line[:] = 0.0
            for j in range(cols):
                grad = g[j] * (f(1.0) - y[j]) * y[j]  # through the sigmoid
                line[x0[j]] += (f(1.0) - lx[j]) * grad
                line[x1[j]] += lx[j] * grad
            top, bottom, share = plane[y0[i]], plane[y1[i]], ly[i]
            for k in range(width):
                top[k] += (f(1.0) - share) * line[k]
                bottom[k] += share * line[k]
        frame, into = x[b].reshape(-1, channels), gx[b].reshape(-1, channels)
        flat = plane.ravel()
        for p in range(flat.shape[0]):
            gp = flat[p]
            gbias[0] += gp
            for c in range(channels):
                into[p, c] = weight[c] * gp
                gweight[c] += np.float64(gp) * frame[p, c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _saliency_head_kernel(x, weight, bias, out):
    """x [B, h, w, C], weight [C] -> out [B, 1, 2h, 2w] (see saliency_head). The source
    coordinate of output pixel i is i * (h - 1) / (2h - 1) in float32, as PyTorch computes it
    for float32 maps, and the corner weights (1 - l, l): each row of the convolution's plane
    interpolated along x first, then every output row from two of those (whole rows: the
    loops vectorise), as PyTorch combines them."""
    batch, height, width, channels = x.shape
    f = out.dtype.type
    plane = np.empty((height, width), dtype=x.dtype)
    rows, cols = out.shape[2], out.shape[3]
    across = np.empty((height, cols), dtype=x.dtype)
    y0, y1, ly = _upsample_taps(height, rows, f)
    x0, x1, lx = _upsample_taps(width, cols, f)
    for b in range(batch):
        frame = x[b].reshape(-1, channels)
        flat = plane.ravel()
        for p in range(flat.shape[0]):
            total = bias
            for c in range(channels):
                total += weight[c] * frame[p, c]
            flat[p] = total
        for y in range(height):
            _lerp_along_x(plane[y], x0, x1, lx, 1, across[y])
        for i in range(rows):
            target = out[b, 0, i]
            _lerp_rows(across[y0[i]], across[y1[i]], ly[i], target)
            for j in range(cols):
                target[j] = sigmoid(target[j], f)[0]
