"""SalMM: published layout, parameter count, initialisation, CMA numerics, determinism."""

import math

import pytest
import torch

from pipeline.encoders.clip import build_clip_encoder
from salmm.model.net import CLIP_PREFIX, CrossModelAtt, SalMM
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)


def small_batch(seed=0, batch=2, h=64, w=64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=gen), torch.randn(batch, 512, generator=gen)


@pytest.fixture(scope="module")
def clip():
    return build_clip_encoder("ViT-B-32", pretrained=None, profile="salmm", seed=0)


def test_trainable_parameters_are_the_published_75918():
    model = SalMM()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 75_918  # the paper's "0.0785M" rounds this figure
    state = model.state_dict()
    assert len(state) == 578
    assert sum(v.numel() for v in state.values()) == 75_918


def test_published_key_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in SalMM().state_dict().items()}
    assert shapes["encoder1.0.weight"] == (8, 3, 3, 3)
    assert shapes["encoder4.0.mamba1.in_proj.weight"] == (24, 6)
    assert shapes["encoder4.0.mamba1.A_b_log"] == (12, 16)
    assert shapes["encoder6.0.mamba4.x_proj_b.weight"] == (33, 16)
    assert shapes["encoder6.0.Inception.branch3.1.conv.weight"] == (4, 8, 5, 5)
    assert shapes["encoder5.0.skip_scale"] == (1,)
    assert shapes["decoder1.0.norm.weight"] == (24,)
    assert shapes["scab.catt.get_all_att.weight"] == (1, 1, 3)
    assert shapes["scab.catt.att5.weight"] == (24, 76)
    assert shapes["scab.satt.shared_conv2d.0.weight"] == (1, 2, 7, 7)
    assert shapes["ebn5.weight"] == (24,) and shapes["dbn1.weight"] == (24,)
    assert shapes["conv5.weight"] == (24, 48, 3, 3) and shapes["conv1.weight"] == (8, 16, 3, 3)
    assert shapes["final.weight"] == (1, 8, 1, 1)
    assert shapes["CrossModelAtt.gamma"] == (1,)
    assert not any(k.startswith(CLIP_PREFIX) for k in shapes)


def test_initialisation_is_the_published_one():
    torch.manual_seed(0)
    model = SalMM()
    assert model.CrossModelAtt.gamma.item() == 0.0
    mamba = model.encoder4[0].mamba1
    # SalMM._init_weights re-initialises every Linear, dt_proj included: its bias ends at 0
    assert torch.equal(mamba.dt_proj.bias.data, torch.zeros(12))
    torch.testing.assert_close(mamba.A_log.data, torch.log(torch.arange(1.0, 17.0)).expand(12, 16))
    assert mamba.D_b._no_weight_decay is True
    att = model.scab.catt.att5.weight
    assert 0.017 < att.std().item() < 0.023 and att.abs().max() < 0.2
    enc = model.encoder1[0]
    assert abs(enc.weight.std().item() / math.sqrt(2 / (9 * 8)) - 1) < 0.15
    assert torch.equal(enc.bias.data, torch.zeros(8))
    assert mamba.conv1d.bias.abs().sum() > 0  # Conv1d bias keeps PyTorch's default init
    assert model.conv5.bias.abs().sum() > 0  # conv1..5 are built after _init_weights


def published_cma(emb, feature, gamma):
    """The published CrossModelAtt.forward after CLIP, transcribed (valid at 256x256 only)."""
    b, c, h, w = feature.shape
    clip_feature = emb.view(b, c, h // 2, w // 2)
    q = clip_feature.view(b, c, -1)
    k = clip_feature.view(b, c, -1).permute(0, 2, 1)
    perception = torch.bmm(q, k)
    perception = torch.max(perception, -1, keepdim=True)[0].expand_as(perception) - perception
    v = feature.view(b, c, -1)
    info = torch.bmm(perception.float(), v.float()).view(b, c, h, w)
    return gamma * info + feature


def test_cma_equals_published_formula_at_256():
    torch.manual_seed(0)
    cma = CrossModelAtt()
    with torch.no_grad():
        cma.gamma.fill_(0.37)
    emb = torch.randn(3, 512)
    feature = torch.randn(3, 32, 8, 8)  # encoder6 output for a 256x256 frame
    assert torch.equal(cma(emb, feature), published_cma(emb, feature, cma.gamma))


def test_cma_works_at_other_sizes_and_starts_as_identity():
    cma = CrossModelAtt()
    feature = torch.randn(2, 32, 3, 5)
    assert torch.equal(cma(torch.randn(2, 512), feature), feature)  # gamma = 0
    with torch.no_grad():
        cma.gamma.fill_(1.0)
    assert cma(torch.randn(2, 512), feature).shape == (2, 32, 3, 5)


@pytest.mark.parametrize("h, w", [(64, 64), (32, 96)])
def test_forward_shape_and_range(h, w):
    torch.manual_seed(0)
    frames, emb = small_batch(h=h, w=w)
    out = SalMM()(frames, emb)
    assert out.shape == (2, 1, h, w)
    assert out.min() > 0 and out.max() < 1


def run_once(seed):
    torch.manual_seed(seed)
    model = SalMM(backend="builtin")
    with torch.no_grad():
        model.CrossModelAtt.gamma.fill_(0.5)  # let the embedding reach the output
    frames, emb = small_batch(h=32, w=32)
    out = model(frames, emb)
    out.mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_forward_backward_finite_and_bitwise_deterministic():
    out1, grads1 = run_once(0)
    out2, grads2 = run_once(0)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2)
    for name, grad in grads1.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        assert torch.equal(grad, grads2[name]), name
    out3, _ = run_once(1)
    assert not torch.equal(out1, out3)


def test_embedding_reaches_output_through_gamma():
    torch.manual_seed(0)
    model = SalMM()
    frames, emb = small_batch()
    assert torch.equal(model(frames, emb), model(frames, torch.randn(2, 512)))  # gamma = 0
    with torch.no_grad():
        model.CrossModelAtt.gamma.fill_(0.5)
    assert not torch.allclose(model(frames, emb), model(frames, torch.randn(2, 512)))


def test_missing_embedding_or_bad_size_is_refused():
    with pytest.raises(ValueError, match="emb"):
        SalMM()(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 32"):
        SalMM()(torch.rand(1, 3, 48, 32), torch.randn(1, 512))


def test_inline_clip_equals_cached_embedding(clip):
    torch.manual_seed(0)
    model = SalMM(clip=clip)
    with torch.no_grad():
        model.CrossModelAtt.gamma.fill_(0.5)
    frames, _ = small_batch()
    emb = clip.encode(frames)  # what the cache stores for these frames
    assert emb.shape == (2, 512) and emb.dtype == torch.float32
    assert torch.equal(model(frames), model(frames, emb))
    model.train()
    assert not clip.training  # the frozen encoder stays in eval mode


def test_clip_is_frozen_and_left_out_of_state_dict(clip):
    torch.manual_seed(0)
    model = SalMM(clip=clip)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 75_918
    state = model.state_dict()
    assert len(state) == 578 and not any(CLIP_PREFIX in k for k in state)
    fresh = SalMM(clip=clip)
    result = fresh.load_state_dict(state, strict=True)  # CLIP weights are not required
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "final.weight"})
