"""pipeline.encoders.clip_packed: CLIP's tower on packed weights against its _ref twin (the
encoder itself) and the tower in float64; attention against nn.MultiheadAttention; fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.core.cpu import intra_op_threads
from pipeline.encoders.clip import build_clip_encoder
from pipeline.encoders.clip_packed import (
    PackedLinear,
    PackedSelfAttention,
    packed_encoder,
    packing_available,
)

needs_mkl = pytest.mark.skipif(not packing_available(), reason="this torch has no MKL packing")


@pytest.fixture(scope="module")
def encoder():
    return build_clip_encoder("ViT-B-32", pretrained=None, profile="salmm", seed=0)


@needs_mkl
def test_packed_tower_equals_the_tower_in_float64(encoder):
    """Batch 1 (the packed rows) and batch 2 (PyTorch's products): within float32 rounding of
    the tower computed in float64, as close as the float32 encoder itself is; the weights are
    shared, not copied; the batch-1 call runs every product on the packed weights."""
    packed = packed_encoder(encoder)
    assert isinstance(packed.visual.transformer.resblocks[0].attn, PackedSelfAttention)
    assert packed.visual.transformer.resblocks[0].mlp.c_fc.weight.data_ptr() == \
        encoder.visual.transformer.resblocks[0].mlp.c_fc.weight.data_ptr()
    exact = copy.deepcopy(encoder).double()
    torch.manual_seed(1)
    for batch in (1, 2):
        frames = torch.rand(batch, 3, 96, 160)
        with torch.inference_mode():
            truth = exact.visual(encoder.preprocess(frames).double())
            ours, twin = packed.encode(frames), encoder.encode(frames)
        ours_error = float((ours.double() - truth).abs().max())
        twin_error = float((twin.double() - truth).abs().max())
        assert ours_error < 2e-5 and twin_error < 2e-5, (ours_error, twin_error)
        assert float(truth.abs().max()) > 0.5                          # not vanishingly small
    with torch.inference_mode(), torch.profiler.profile() as profile:
        packed.encode(torch.rand(1, 3, 96, 160))
    calls = {e.key: e.count for e in profile.key_averages()}
    assert calls.get("mkl::_mkl_linear") == 4 * len(packed.visual.transformer.resblocks)


@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_attention_is_multihead_self_attention(batch_first: bool):
    """In float64 (its products then run as F.linear): nn.MultiheadAttention's own numbers, in
    both layouts; a call that is not plain self-attention is the module's call."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(64, 4, batch_first=batch_first).double().eval()
    ours = PackedSelfAttention(attention, rows=10)
    x = torch.randn((2, 5, 64) if batch_first else (5, 2, 64), dtype=torch.float64)
    with torch.no_grad():
        want = attention(x, x, x, need_weights=False)[0]
        got, weights = ours(x, x, x, need_weights=False)
        assert weights is None
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        other = torch.randn_like(x)
        torch.testing.assert_close(ours(x, other, other, need_weights=False)[0],
                                   attention(x, other, other, need_weights=False)[0],
                                   rtol=0, atol=0)


@needs_mkl
def test_packed_linear_falls_back_exactly():
    """Another row count, float64, or gradients needed: F.linear's own result (and gradient)."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    ours = PackedLinear(linear.weight, linear.bias, rows=6)
    x = torch.randn(3, 2, 32)
    with torch.no_grad():
        assert ours.packable and ours.packings
        exact = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
        torch.testing.assert_close(ours(x).double(), exact, rtol=0, atol=1e-5)   # packed rows
        other = torch.randn(5, 32)
        assert torch.equal(ours(other), linear(other))
        wide = nn.Linear(32, 48).double()
        assert not PackedLinear(wide.weight, wide.bias, rows=6).packings
        assert torch.equal(PackedLinear(wide.weight, wide.bias, rows=6)(x.double()),
                           wide(x.double()))
    x.requires_grad_(True)
    twin = x.detach().clone().requires_grad_(True)
    ours(x).sum().backward()
    linear(twin).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, twin.grad)


@needs_mkl
def test_weights_are_packed_for_the_thread_count_of_the_call():
    """MKL splits a packed product among the threads it was packed for: each intra-op thread
    count gets its own packing (the last two kept), and every one computes the product."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    x = torch.randn(6, 32)
    exact = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    with torch.no_grad(), intra_op_threads(1):
        ours = PackedLinear(linear.weight, linear.bias, rows=6)
        assert list(ours.packings) == [1]
    for threads, kept in ((2, [1, 2]), (1, [1, 2]), (3, [2, 3])):
        with torch.no_grad(), intra_op_threads(threads):
            torch.testing.assert_close(ours(x).double(), exact, rtol=0, atol=1e-5)
        assert sorted(ours.packings) == kept, threads


def test_packing_leaves_other_encoders_alone(encoder):
    """Off the CPU's float32 (here: a float64 copy) the encoder itself comes back."""
    other = copy.deepcopy(encoder).double()
    assert packed_encoder(other) is other
