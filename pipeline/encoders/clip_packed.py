"""CLIP's image tower for one frame at a time on a CPU: its transformer's matrix products on
weights packed for Intel MKL's GEMM once per thread count, instead of again on every call.

At batch 1 each ViT-B/32 product multiplies 50 tokens by a weight of up to 768 x 3072, and MKL's
``sgemm`` first copies the whole weight into its panel layout: in a ``salmm stream`` run that copy
(``sgemm_scopy``) took 24% of all CPU samples against 6% for the products themselves.
:func:`packed_encoder` copies an encoder - sharing its weight tensors, not copying them - and
swaps, inside ``visual.transformer``, every ``nn.Linear`` for a :class:`PackedLinear` and every
self-attention ``nn.MultiheadAttention`` for a :class:`PackedSelfAttention`: the same functions
(in-projection, scaled dot-product attention per head, out-projection; the MLP's two products),
whose products run on weights packed by ``cblas_sgemm_pack`` for a fixed number of rows (the
tokens of ``batch`` frames). A call with another number of rows, in another dtype, on another
device or needing gradients runs PyTorch's own product instead, so the copy is correct for any
input and only fast for the one it was packed for.

Numbers: float32, the same operations as the encoder; the products sum in another order, so the
embedding differs from the encoder's by float32 rounding (a few 1e-6 on ViT-B/32; the encoder is
its ``_ref`` twin: ``tests/test_clip_packed.py`` holds both against the tower in float64). The
cache (:func:`~pipeline.encoders.clip.embed_pairs`) never uses it: its bytes stay those of the
encoder. The packed weights are a second copy of the tower's linear weights in memory (about
340 MB for ViT-B/32), a third once it has run at a second intra-op thread count
(:class:`PackedLinear` packs for the count of the call).

Without MKL (``torch._C.has_mkl`` false, e.g. ARM), or off the CPU, :func:`packed_encoder`
returns the encoder itself.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.encoders.clip import ClipEncoder, ClipSpec, cached_encoder

__all__ = ["PackedLinear", "PackedSelfAttention", "inference_encoder", "packed_encoder"]

log = logging.getLogger(__name__)


def packing_available() -> bool:
    """Whether this torch has MKL's packed GEMM (``torch.ops.mkl._mkl_linear``)."""
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` (weight [out, in] and bias shared, not copied) on a copy
    of the weight packed for MKL's GEMM at ``rows`` rows: x [..., in] -> [..., out], where the
    leading dimensions multiply to ``rows``; any other x (rows, dtype, device, or gradients
    needed), or a weight that is not float32 on the CPU, runs ``F.linear`` itself.

    MKL fixes how a product is split among threads when it packs the weight, by the thread
    count in force then: weights packed on one thread ran on one thread only (a ViT-B/32 frame
    on two threads: 91 against 58 ms). So the weight is packed for the intra-op thread count
    of the call (``torch.get_num_threads()``), once per count, keeping its copies for the last
    :data:`KEEP_PACKINGS` counts it packed for."""

    KEEP_PACKINGS = 2

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        super().__init__()
        self.weight, self.bias, self.rows = weight, bias, rows
        self.packable = (packing_available() and weight.dtype == torch.float32
                         and weight.device.type == "cpu")
        self.packings: dict[int, Tensor] = {}  # intra-op threads -> the weight packed for them
        if self.packable:
            self.packed_for(torch.get_num_threads())

    def packed_for(self, threads: int) -> Tensor:
        """The weight packed for ``threads`` intra-op threads (packed now, on this thread's
        count, if it was not; calls from several threads at once each get a whole copy)."""
        packed = self.packings.get(threads)
        if packed is None:
            with torch.no_grad():
                packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), self.rows)
            kept = list(self.packings.items())
            kept = kept[max(0, len(kept) - self.KEEP_PACKINGS + 1):]
            self.packings = {**dict(kept), threads: packed}   # one assignment: no torn dict
        return packed

    def forward(self, x: Tensor) -> Tensor:
        if (not self.packable or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.numel() == 0
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or x.numel() // x.shape[-1] != self.rows):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(self.rows, x.shape[-1])
        out = torch.ops.mkl._mkl_linear(flat, self.packed_for(torch.get_num_threads()),
                                        self.weight, self.bias, self.rows)
        return out.view(*x.shape[:-1], out.shape[-1])


def _self_attention_only(attention: nn.MultiheadAttention) -> bool:
    """Whether ``attention`` is what :class:`PackedSelfAttention` computes: one in-projection
    with a bias, no extra key/value biases or zero attention."""
    return (attention._qkv_same_embed_dim and attention.in_proj_bias is not None
            and attention.bias_k is None and attention.bias_v is None
            and not attention.add_zero_attn)


class PackedSelfAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (in eval mode) as self-attention on packed products.

    ``forward(query, key, value, ...)`` takes the module's arguments; when key and value are
    the query and no mask or weights are asked for (a ViT's blocks), it computes x [N, L, D]
    (``batch_first``, else [L, N, D]) -> in-projection -> per-head scaled dot-product attention
    -> out-projection, the products on :class:`PackedLinear`; otherwise it calls the module.
    Returns (output, None) as the module does with ``need_weights=False``."""

    def __init__(self, attention: nn.MultiheadAttention, rows: int) -> None:
        super().__init__()
        self.attention = attention
        self.heads, self.batch_first = attention.num_heads, attention.batch_first
        self.in_proj = PackedLinear(attention.in_proj_weight, attention.in_proj_bias, rows)
        self.out_proj = PackedLinear(attention.out_proj.weight, attention.out_proj.bias, rows)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None, **rest: Any
                ) -> tuple[Tensor, None]:
        if (key is not query or value is not query or key_padding_mask is not None
                or attn_mask is not None or need_weights or rest.get("is_causal")):
            return self.attention(query, key, value, key_padding_mask=key_padding_mask,
                                  need_weights=need_weights, attn_mask=attn_mask, **rest)
        x = query if self.batch_first else query.transpose(0, 1)            # [N, L, D]
        n, length, width = x.shape
        qkv = self.in_proj(x).view(n, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # [N, H, L, d]
        mixed = F.scaled_dot_product_attention(q, k, v)
        out = self.out_proj(mixed.transpose(1, 2).reshape(n, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _pack(module: nn.Module, rows: int) -> int:
    """Swap, below ``module``, each self-attention and each linear layer for its packed twin;
    returns how many were swapped."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention) and _self_attention_only(child):
            setattr(module, name, PackedSelfAttention(child, rows))
            swapped += 1
        elif type(child) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
            setattr(module, name, PackedLinear(child.weight, child.bias, rows))
            swapped += 1
        else:
            swapped += _pack(child, rows)
    return swapped


def packed_encoder(encoder: ClipEncoder, batch: int = 1) -> ClipEncoder:
    """A copy of ``encoder`` whose transformer runs on weights packed for ``batch`` frames a
    call (see the module docstring); the encoder itself where MKL's packing is not available,
    the encoder is not on the CPU, or its tower has no transformer to pack."""
    visual = encoder.visual
    weight = next(encoder.parameters())
    tokens = getattr(visual, "positional_embedding", None)
    if (not packing_available() or weight.device.type != "cpu" or weight.dtype != torch.float32
            or not hasattr(visual, "transformer") or tokens is None):
        return encoder
    shared = {id(t): t for t in [*encoder.parameters(), *encoder.buffers()]}
    packed = copy.deepcopy(encoder, memo=shared)
    swapped = _pack(packed.visual.transformer, batch * tokens.shape[0])
    log.debug("CLIP tower packed for MKL: %d layers, %d rows a call", swapped,
              batch * tokens.shape[0])
    return packed


@functools.lru_cache(maxsize=2)
def inference_encoder(spec: ClipSpec, device: str = "cpu") -> ClipEncoder:
    """The encoder of ``spec`` for one frame a call (live inference), once per process:
    :func:`packed_encoder` of :func:`~pipeline.encoders.clip.cached_encoder`."""
    return packed_encoder(cached_encoder(spec, device))
