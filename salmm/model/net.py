"""SalM^2 (AAAI 2025): a 76k-parameter saliency Mamba guided by a frozen CLIP embedding.

A faithful re-implementation of the published ``SalMM`` module (attribute names, shapes,
initialisation and numerics kept, so the authors' checkpoints load key for key):

    frame [B, 3, H, W] --encoder1..3 (conv, GroupNorm, max-pool, GELU)----------> t1, t2, t3
                       --encoder4..5 (SCPMamba layers, GroupNorm, max-pool, GELU)-> t4, t5
    t1..t5 --scab (spatial then channel attention bridge)--> skip features
    t5 --encoder6 (SCPMamba, GELU)--> deepest feature --CrossModelAtt(CLIP embedding)-->
    --decoder1..3 (SCPMamba) / decoder4..5 (conv), each upsampled 2x and fused with a skip
    by conv5..conv1 --final 1x1 conv, 2x upsample, sigmoid--> saliency [B, 1, H, W] in (0, 1)

H and W must be multiples of 32. On CPU every forward first lets :func:`pipeline.core.cpu.adapt_threads`
set torch's intra-op thread count to the cores other processes leave free (a busy core makes
every one of the model's small operators wait for a thread that has no core). The CLIP image embedding (512-d, ViT-B/32) is either given
(cached; see :mod:`pipeline.encoders.clip` for the preprocessing) or computed inline by an
attached frozen encoder, the published behaviour.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.cpu import adapt_threads
from pipeline.encoders.clip_spec import PUBLISHED, ClipSpec
from salmm.model.mamba import Mamba

__all__ = ["CLIP_PREFIX", "CrossModelAtt", "SCPMambaLayer", "SalMM", "build_model"]

log = logging.getLogger(__name__)

CLIP_PREFIX = "CrossModelAtt.model."  # where the published module keeps its frozen CLIP
CHANNELS = (8, 12, 16, 16, 24, 32)
"""Feature channels of encoder1..encoder6 (the published ``c_list``)."""


class CrossModelAtt(nn.Module):
    """Cross-modal attention: query and key from CLIP, value from the deepest image feature.

    With the embedding e [B, 512] viewed as q [B, C, 512/C] (C = 32 channels: [B, 32, 16]),
    P = q q^T [B, C, C] and out = gamma * ((max_j P_ij - P_ij) @ v) + feature, v = the
    feature as [B, C, h*w]. ``gamma`` starts at 0, so the block starts as the identity.

    The published code views e as [B, C, h/2, w/2] before flattening, which only fits when
    h*w/4 = 512/C (a 256x256 input); viewing it as [B, C, 512/C] is the same tensor there and
    works at any input size. ``model`` is the optional frozen CLIP encoder (published name).
    On CUDA the published ``clip.load`` ran CLIP in float16, so there q q^T was a float16
    product; here the embedding is float32 throughout (float64 in a float64 model, which the
    export's graph check runs).
    """

    def __init__(self, clip: nn.Module | None = None, backend: str = "auto"):
        super().__init__()
        self.model = clip
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = backend  # "auto": the CPU kernel for inference where it applies (fused)

    def forward(self, emb: Tensor, feature: Tensor) -> Tensor:
        if fused(self.backend, feature, self.gamma):  # CPU inference: one kernel call
            return _kernels()[1].cross_attention(self, emb, feature)
        b, c, h, w = feature.shape
        dtype = torch.promote_types(feature.dtype, torch.float32)  # float32, or float64 checks
        q = emb.to(dtype).reshape(b, c, -1)  # [B, C, 512/C]
        perception = torch.bmm(q, q.transpose(1, 2))  # [B, C, C]
        perception = perception.amax(-1, keepdim=True) - perception
        info = torch.bmm(perception, feature.to(dtype).reshape(b, c, h * w))  # [B, C, h*w]
        return self.gamma * info.reshape(b, c, h, w) + feature


@functools.cache
def _kernels():
    """(:mod:`salmm.model.layer_cpu`, :mod:`salmm.model.maps_cpu`,
    :mod:`salmm.model.layer_train_cpu`), or None when numba does not import (the reason is
    logged)."""
    try:
        from salmm.model import layer_cpu, layer_train_cpu, maps_cpu  # lazy: numba may be missing
    except ImportError as exc:
        log.info("fused CPU inference kernels unavailable (%s: %s)", type(exc).__name__, exc)
        return None
    return layer_cpu, maps_cpu, layer_train_cpu


def cpu_kernels_apply(backend: str, x: Tensor) -> bool:
    """Whether salmm's CPU kernels can take x: Mamba backend "auto", a float32 / float64 CPU
    input, no CPU autocast (which changes the modules' dtypes; the modules then run as asked)
    and numba available. Backend "builtin" runs module by module: the kernels' ``_ref``
    twin."""
    return (backend == "auto" and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and _kernels() is not None)


def fused(backend: str, x: Tensor, parameter: Tensor) -> bool:
    """Whether a forward on x runs the fused inference kernels: :func:`cpu_kernels_apply` and
    no autograd to record (``parameter``: one of the module's own)."""
    return (cpu_kernels_apply(backend, x)
            and not (torch.is_grad_enabled() and (x.requires_grad or parameter.requires_grad)))


class BasicConv2d(nn.Module):
    """Conv2d followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, **kwargs)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x))


class Inception(nn.Module):
    """Four parallel branches: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max-pool -> 1x1."""

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # the convolutions on channels-first memory: on these small maps oneDNN's channels-last
        # convolutions round differently with the thread count, which the width-2 LayerNorms
        # after them amplify; the max-pool, exact in any memory order, on channels-last memory,
        # where PyTorch's CPU kernel runs 4-7x faster
        dense = x.contiguous()
        pooled = self.branch4[0](x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self.branch1(dense), self.branch2(dense), self.branch3(dense), self.branch4[1](pooled)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters) computed on channels-first memory, returned in
    channels-last memory like the convolutions around it (see SalMM.forward): PyTorch's
    channels-last GroupNorm kernel is about 25x less accurate in float32 on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


class SCPMambaLayer(nn.Module):
    """Inception split into four channel groups, each a bidirectional Mamba over the pixels in
    raster order (with a LayerNorm before and a learnable skip after), concatenated and
    LayerNormed. dim_ = (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj); the four group
    widths dim_[0], dim_[2], dim_[4], dim_[5] sum to output_dim.
    """

    def __init__(self, input_dim, output_dim, dim_, d_state=16, d_conv=4, expand=2, backend="auto"):
        super().__init__()
        self.input_dim, self.output_dim, self.dim_ = input_dim, output_dim, list(dim_)
        widths = [dim_[0], dim_[2], dim_[4], dim_[5]]
        assert sum(widths) == output_dim, f"group widths {widths} must sum to {output_dim}"
        self.norm = nn.LayerNorm(output_dim)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(w) for w in widths)
        self.mamba1, self.mamba2, self.mamba3, self.mamba4 = (
            Mamba(w, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend) for w in widths
        )
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.Inception = Inception(input_dim, *dim_)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float16:
            x = x.float()
        if fused(self.backend, x, self.skip_scale):
            return _kernels()[0].layer_forward(self, x)
        if cpu_kernels_apply(self.backend, x):  # training on a CPU: one kernel pair
            return _kernels()[2].layer_forward(self, x)
        B, C, H, W = x.shape
        assert C == self.input_dim, f"expected {self.input_dim} channels, got {C}"
        groups = []
        branches = self.Inception(x)  # 4 x [B, width_i, H, W]
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        mambas = (self.mamba1, self.mamba2, self.mamba3, self.mamba4)
        for branch, norm, mamba in zip(branches, norms, mambas):
            seq = norm(branch.flatten(2).transpose(1, 2))  # [B, H*W, width_i], raster order
            groups.append(mamba(seq) + self.skip_scale * seq)
        out = self.norm(torch.cat(groups, dim=2))  # [B, H*W, output_dim]
        return out.transpose(1, 2).reshape(B, self.output_dim, H, W)


class ChannelAttBridge(nn.Module):
    """Channel attention shared by the five skip features (published ``split_att='fc'``)."""

    def __init__(self, c_list):
        super().__init__()
        c_sum = sum(c_list) - c_list[-1]  # 8 + 12 + 16 + 16 + 24 = 76 pooled channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.get_all_att = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)
        self.att1, self.att2, self.att3, self.att4, self.att5 = (
            nn.Linear(c_sum, c) for c in c_list[:5]
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, *ts: Tensor) -> list[Tensor]:
        weights = self.attention([self.avgpool(t) for t in ts])
        return [w.expand_as(t) for w, t in zip(weights, ts)]  # broadcast over the map

    def attention(self, pooled: list[Tensor]) -> list[Tensor]:
        """The five maps' channel means (each [B, c_i, 1, 1]) -> their weights [B, c_i, 1, 1]."""
        att = torch.cat(pooled, dim=1)  # [B, 76, 1, 1]
        att = self.get_all_att(att.squeeze(-1).transpose(-1, -2))  # [B, 1, 76]
        heads = (self.att1, self.att2, self.att3, self.att4, self.att5)
        # each head: [B, 1, c_i] -> [B, c_i, 1, 1]
        return [self.sigmoid(head(att)).transpose(-1, -2).unsqueeze(-1) for head in heads]


class SpatialAttBridge(nn.Module):
    """Spatial attention: one dilated 7x7 conv on [channel mean, channel max] of each map."""

    def __init__(self):
        super().__init__()
        self.shared_conv2d = nn.Sequential(
            nn.Conv2d(2, 1, 7, stride=1, padding=9, dilation=3), nn.Sigmoid()
        )

    def forward(self, *ts: Tensor) -> list[Tensor]:
        pooled = [torch.cat([t.mean(1, keepdim=True), t.amax(1, keepdim=True)], 1) for t in ts]
        pooled = [p.contiguous(memory_format=torch.channels_last) for p in pooled]  # as the maps
        return [self.shared_conv2d(p) for p in pooled]  # each [B, 1, h_i, w_i]


class SCAttBridge(nn.Module):
    """Spatial attention (residual), then channel attention, plus the spatial-attended map."""

    def __init__(self, c_list, backend: str = "auto"):
        super().__init__()
        self.catt = ChannelAttBridge(c_list)
        self.satt = SpatialAttBridge()
        self.backend = backend  # "auto": the CPU kernels where they apply (cpu_kernels_apply)

    def forward(self, *ts: Tensor, fusion: list[Tensor] | None = None) -> list[Tensor]:
        """ts: the five maps [B, C_i, H_i, W_i] -> the five attention-weighted maps (the same
        shapes). ``fusion``: channels-last tensors [B, K_i + C_i, H_i, W_i] (the fusion
        convolutions' inputs) whose last C_i channels receive the results, returned as views
        of them."""
        if fused(self.backend, ts[0], self.catt.att1.weight):  # inference: one kernel call
            return _kernels()[1].bridge(self.satt.shared_conv2d[0], self.catt, ts, fusion)
        if cpu_kernels_apply(self.backend, ts[0]):  # training, with the kernels' backward
            parts = [_kernels()[1].spatial_attention(self.satt.shared_conv2d[0], t) for t in ts]
            c_att = self.catt.attention([pooled[..., None, None] for _, _, pooled in parts])
            outs = [_kernels()[1].bridge_output(s, a, m) for a, (s, m, _) in zip(c_att, parts)]
        else:
            s_att = [a * t for a, t in zip(self.satt(*ts), ts)]
            mixed = [s + t for s, t in zip(s_att, ts)]
            c_att = self.catt(*mixed)
            outs = [a * m + s for a, m, s in zip(c_att, mixed, s_att)]
        if fusion is None:
            return outs
        views = [f.narrow(1, f.shape[1] - o.shape[1], o.shape[1]) for f, o in zip(fusion, outs)]
        for view, out in zip(views, outs):
            view.copy_(out)
        return views


class _DenseGradient(torch.autograd.Function):
    """The identity, whose backward hands the gradient on in dense channels-last memory (one
    copy when it is not)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def _drop_clip_weights(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + CLIP_PREFIX)]:
        del state_dict[key]


def _clip_weights_not_required(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if CLIP_PREFIX not in k]


class SalMM(nn.Module):
    """The SalM^2 network. forward(frames [B, 3, H, W] in [0, 1], emb [B, 512] or None)
    -> saliency [B, 1, H, W] in (0, 1). H, W multiples of 32 (published: 256 x 256).

    clip: optional frozen encoder (``pipeline.encoders.clip.ClipEncoder``) used when ``emb`` is
    None; it is stored at ``CrossModelAtt.model`` as published and is not trainable. The
    state_dict leaves it out (as the authors' released "incomplete" checkpoints do) and
    load_state_dict does not ask for it: the encoder is named by its ``identity`` instead.
    backend: Mamba backend for every block ("auto", "builtin" or "cuda"; see salmm.model.mamba).
    The channel widths are the published ones (:data:`CHANNELS`): the fusion convolutions and
    the SCPMamba group widths are written for them, so they are not a parameter.
    """

    def __init__(
        self,
        num_classes=1,
        input_channels=3,
        clip: nn.Module | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        c = list(CHANNELS)
        self.backend = backend

        def scpm(cin, cout, dims):
            return nn.Sequential(SCPMambaLayer(cin, cout, dims, backend=backend))

        def conv3(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=1, padding=1))

        self.encoder1 = conv3(input_channels, c[0])
        self.encoder2 = conv3(c[0], c[1])
        self.encoder3 = conv3(c[1], c[2])
        self.encoder4 = scpm(c[2], c[3], [6, 2, 4, 4, 2, 4])
        self.encoder5 = scpm(c[3], c[4], [9, 3, 6, 6, 3, 6])
        self.encoder6 = scpm(c[4], c[5], [12, 4, 8, 8, 4, 8])
        self.scab = SCAttBridge(c, backend)
        self.decoder1 = scpm(c[5], c[4], [9, 3, 6, 6, 3, 6])
        self.decoder2 = scpm(c[4], c[3], [6, 2, 4, 4, 2, 4])
        self.decoder3 = scpm(c[3], c[2], [6, 2, 4, 4, 2, 4])
        self.decoder4 = conv3(c[2], c[1])
        self.decoder5 = conv3(c[1], c[0])
        self.ebn1, self.ebn2, self.ebn3, self.ebn4, self.ebn5 = (GroupNorm(4, k) for k in c[:5])
        self.dbn1, self.dbn2, self.dbn3, self.dbn4, self.dbn5 = (
            GroupNorm(4, k) for k in (c[4], c[3], c[2], c[1], c[0])
        )
        self.final = nn.Conv2d(c[0], num_classes, kernel_size=1)
        self.apply(self._init_weights)  # as published: before CrossModelAtt and conv1..5,
        self.CrossModelAtt = CrossModelAtt(clip, backend)  # which keep PyTorch's default init
        self.conv5 = nn.Conv2d(48, 24, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(32, 16, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(24, 12, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(16, 8, kernel_size=3, padding=1)
        self.register_state_dict_post_hook(_drop_clip_weights)
        self.register_load_state_dict_post_hook(_clip_weights_not_required)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Published init. Note it re-initialises every Linear, including Mamba's dt_proj:
        its bias (the dt bias) ends at 0 - the ``_no_reinit`` flag is not consulted."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv1d):  # Mamba's depthwise convs and get_all_att; bias kept
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.out_channels)))
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, ref: str, *, backend: str = "auto") -> SalMM:
        """The SalMM (eval mode, CPU, no CLIP attached) of a Hub folder, a Hub id
        ``owner/name[@revision]`` or a checkpoint file (ours or the authors'): every key
        checked, no code from the download run (:mod:`salmm.model.hub`)."""
        from salmm.model.loading import read_weights  # lazy: loading imports this module

        model = cls(backend=backend)
        model.load_state_dict(read_weights(ref).state_dict, strict=True)
        return model.eval()

    def save_pretrained(self, folder: str, *, size: tuple[int, int] = (256, 256),
                        clip: ClipSpec = PUBLISHED, dataset: str | None = None,
                        dataset_version: str | None = None,
                        metrics: dict[str, float] | None = None) -> None:
        """Write this model's weights as a Hub folder (model.safetensors, config.json, a model
        card). ``size`` / ``clip``: what it was trained at and with (its users need the same
        CLIP); ``dataset_version``: the prepared data it was trained on, if any. To convert a
        checkpoint with all it records, use ``salmm export --hub-folder``."""
        from salmm.model import hub  # lazy: hub reads weights back through this module

        meta = hub.pretrained_config(
            size=size, clip={"clip_model": clip.model, "clip_pretrained": clip.pretrained,
                             "profile": clip.profile},
            trained_cached_clip=None, kind="salmm-train", sha256="", epoch=None,
            valid_loss=None, git_commit=None, dataset=dataset, dataset_version=dataset_version,
            metrics=metrics, training=None, metrics_from="the values given to save_pretrained")
        hub.write_pretrained(folder, self.state_dict(), meta, hub.model_card(meta))

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    **saved) -> str:
        """:meth:`save_pretrained` (``saved``: its options) into a temporary folder, uploaded
        to Hub model repository ``repo_id``; the commit's URL."""
        import tempfile  # lazy: only for Hub folders

        from salmm.model import hub  # lazy: as in save_pretrained

        with tempfile.TemporaryDirectory(prefix="salmm-hub-") as folder:
            self.save_pretrained(folder, **saved)
            return hub.push_folder(folder, repo_id, private=private, token=token)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(
                f"SalMM expects frames [B, 3, H, W], H and W multiples of 32, got {tuple(x.shape)}"
            )
        if x.device.type == "cpu":
            adapt_threads()  # intra-op threads = cores other processes leave free (pipeline.core.cpu)
        if emb is None:
            if self.CrossModelAtt.model is None:
                raise ValueError("SalMM.forward needs `emb` [B, 512] or a model built with clip=")
            emb = self.CrossModelAtt.model.encode(x)  # [B, 512], frozen, no grad
        # Same values, channels-last memory ([B, H, W, C] order) from here on: oneDNN's CPU
        # convolutions and pooling run 2-4x faster on it, and SCPMambaLayer's pixel sequences
        # [B, H*W, C] are then views, not copies.
        x = x.contiguous(memory_format=torch.channels_last)
        fast = fused(self.backend, x, self.final.weight)
        # training on a CPU: GroupNorm on channels-last memory, with its own backward
        training_cpu = not fast and cpu_kernels_apply(self.backend, x)

        def after(gn, inp, resize=None, into=None):  # GELU(resize(GroupNorm(inp)))
            if fast:  # one kernel, written into `into` when given
                return _kernels()[1].group_norm_gelu(gn, inp, resize, into)
            if training_cpu:
                out = _kernels()[1].group_norm_autograd(gn, inp, pool=resize == "pool")
            else:
                out = F.max_pool2d(gn(inp), 2, 2) if resize == "pool" else gn(inp)
            if resize != "upsample":
                return F.gelu(out)
            out = F.gelu(F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True))
            # its gradient comes back as a channel slice of the fusion conv's (torch.cat's
            # backward); GELU's backward on such strides beside a channels-last input runs 9x
            # slower than on dense memory
            return _DenseGradient.apply(out) if training_cpu else out

        def down(conv, gn, inp):  # conv, GroupNorm, 2x2 max-pool, GELU
            return after(gn, conv(inp), "pool")

        t1 = down(self.encoder1, self.ebn1, x)  # [B, 8, H/2, W/2]
        t2 = down(self.encoder2, self.ebn2, t1)  # [B, 12, H/4, W/4]
        t3 = down(self.encoder3, self.ebn3, t2)  # [B, 16, H/8, W/8]
        t4 = down(self.encoder4, self.ebn4, t3)  # [B, 16, H/16, W/16]  (Mamba on H/8 x W/8)
        t5 = down(self.encoder5, self.ebn5, t4)  # [B, 24, H/32, W/32]
        out = F.gelu(self.encoder6(t5))  # [B, 32, H/32, W/32], from t5 before the bridge
        skips = (t1, t2, t3, t4, t5)
        if fast:  # each fusion convolution's input [B, 2 C_i, h_i, w_i] made once, the bridge
            # and the decoder writing their halves into it where torch.cat would copy both
            fusion = [torch.empty(t.shape[0], t.shape[2], t.shape[3], 2 * t.shape[1],
                                  dtype=t.dtype).permute(0, 3, 1, 2) for t in skips]
            skips = self.scab(*skips, fusion=fusion)
        else:
            skips = self.scab(*skips)  # same shapes, attention-weighted

        def decode(block, gn, inp, level, resize="upsample"):
            # block, GroupNorm, 2x bilinear upsample (if asked), GELU, beside the bridge's map
            # of the same level: the fusion convolution's input
            if fast:
                half = fusion[level].narrow(1, 0, skips[level].shape[1])
                after(gn, block(inp), resize, into=half)
                return fusion[level]
            return torch.cat([after(gn, block(inp), resize), skips[level]], dim=1)

        out = self.CrossModelAtt(emb, out)  # [B, 32, H/32, W/32]

        out5 = self.conv5(decode(self.decoder1, self.dbn1, out, 4, None))  # [B, 24+24 -> 24, H/32]
        out4 = self.conv4(decode(self.decoder2, self.dbn2, out5, 3))  # [B, 16+16 -> 16, H/16]
        out3 = self.conv3(decode(self.decoder3, self.dbn3, out4, 2))  # [B, 16+16 -> 16, H/8]
        out2 = self.conv2(decode(self.decoder4, self.dbn4, out3, 1))  # [B, 12+12 -> 12, H/4]
        out1 = self.conv1(decode(self.decoder5, self.dbn5, out2, 0))  # [B, 8+8 -> 8, H/2]
        if fast or training_cpu:  # the 1x1 conv, 2x upsample and sigmoid in one kernel
            return _kernels()[1].saliency_head(self.final, out1)
        out0 = F.interpolate(self.final(out1.contiguous()), scale_factor=2, mode="bilinear", align_corners=True)
        return torch.sigmoid(out0)  # [B, 1, H, W]


def build_model(
    cached_clip: bool = True,
    clip: ClipSpec = PUBLISHED,
    backend: str = "auto",
    device: str | torch.device = "cpu",
) -> SalMM:
    """The one model factory: SalMM on ``device``, fed cached embeddings, or (cached_clip=False)
    with its own frozen CLIP encoder ``clip`` (:func:`pipeline.encoders.clip.cached_encoder`; one
    BadInputError line when its weights cannot be had)."""
    if cached_clip:
        return SalMM(backend=backend).to(device)
    from pipeline.encoders.clip import cached_encoder  # lazy: open_clip only when CLIP runs here
    return SalMM(clip=cached_encoder(clip, str(device)), backend=backend).to(device)
