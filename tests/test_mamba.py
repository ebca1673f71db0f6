"""Bidirectional Mamba block: layout, initialisation, numerics, backends."""

import math

import pytest
import torch
import torch.nn.functional as F

from salmm.model.mamba import Mamba, cuda_kernels_available
from salmm.model.scan import selective_scan_ref
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)


def published_formula(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """Direct transcription of the vendored bimamba fast path with the loop reference scan."""
    length = h.shape[1]
    xz = (h @ m.in_proj.weight.t()).transpose(1, 2)

    def branch(xz, conv, x_proj, dt_proj, A_log, D):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=m.d_conv - 1, groups=m.d_inner))
        x = x[..., :length]
        x_dbl = x.transpose(1, 2).reshape(-1, m.d_inner) @ x_proj.weight.t()
        dt, B, C = x_dbl.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = (dt_proj.weight @ dt.t()).reshape(m.d_inner, -1, length).transpose(0, 1)
        B = B.reshape(-1, length, m.d_state).transpose(1, 2)
        C = C.reshape(-1, length, m.d_state).transpose(1, 2)
        return selective_scan_ref(
            x, dt, -torch.exp(A_log), B, C, D, z=z, delta_bias=dt_proj.bias, delta_softplus=True
        )

    out = branch(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    out_b = branch(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b)
    return F.linear((out + out_b.flip(-1)).transpose(1, 2), m.out_proj.weight)


def test_parameter_layout_matches_published_block():
    m = Mamba(d_model=6)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (24, 6),
        "conv1d.weight": (12, 1, 4),
        "conv1d.bias": (12,),
        "x_proj.weight": (33, 12),
        "dt_proj.weight": (12, 1),
        "dt_proj.bias": (12,),
        "A_log": (12, 16),
        "D": (12,),
        "A_b_log": (12, 16),
        "conv1d_b.weight": (12, 1, 4),
        "conv1d_b.bias": (12,),
        "x_proj_b.weight": (33, 12),
        "dt_proj_b.weight": (12, 1),
        "dt_proj_b.bias": (12,),
        "D_b": (12,),
        "out_proj.weight": (6, 12),
    }
    assert m.dt_rank == 1 and Mamba(d_model=17).dt_rank == 2


def test_initialisation_follows_vendored_mamba():
    torch.manual_seed(0)
    m = Mamba(d_model=8, dt_min=0.001, dt_max=0.1)
    expected_a = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(16, 16)
    torch.testing.assert_close(m.A_log.data, expected_a)
    torch.testing.assert_close(m.A_b_log.data, expected_a)
    assert torch.equal(m.D.data, torch.ones(16)) and torch.equal(m.D_b.data, torch.ones(16))
    for p in (m.A_log, m.A_b_log, m.D, m.D_b):
        assert p._no_weight_decay is True
    assert m.dt_proj.bias._no_reinit is True
    dt = F.softplus(m.dt_proj.bias.data)
    assert dt.min() >= 0.001 - 1e-6 and dt.max() <= 0.1 + 1e-6
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.in_proj.bias is None and m.out_proj.bias is None


@pytest.mark.parametrize("length", [1, 5, 64])
def test_forward_and_grads_match_published_formula(length):
    torch.manual_seed(length)
    m = Mamba(d_model=4, backend="builtin").double()
    for p in m.parameters():  # move away from the symmetric init so both branches differ
        p.data.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, length, 4, dtype=torch.float64, requires_grad=True)
    got = m(h)
    want = published_formula(m, h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = [h, *m.parameters()]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_block_is_bidirectional():
    torch.manual_seed(0)
    m = Mamba(d_model=4)
    h = torch.randn(1, 10, 4)
    h2 = h.clone()
    h2[:, -1] += 1.0
    out, out2 = m(h), m(h2)
    assert not torch.allclose(out[:, 0], out2[:, 0])  # the backward branch sees the future
    h3 = h.clone()
    h3[:, 0] += 1.0
    assert not torch.allclose(m(h3)[:, -1], out[:, -1])


def test_backend_argument_is_checked():
    with pytest.raises(ValueError, match="backend"):
        Mamba(4, backend="triton")
    m = Mamba(4, backend="cuda")
    if not cuda_kernels_available():
        with pytest.raises(RuntimeError, match="mamba-ssm"):
            m(torch.randn(1, 3, 4))
    assert Mamba(4, backend="auto").resolved_backend(torch.device("cpu")) == "builtin"


@pytest.mark.skipif(not cuda_kernels_available(), reason="needs CUDA and mamba-ssm kernels")
def test_cuda_kernels_match_torch_backend():
    torch.manual_seed(0)
    m = Mamba(d_model=6).cuda()
    h = torch.randn(4, 257, 6, device="cuda", requires_grad=True)
    m.backend = "cuda"
    out_cuda = m(h)
    grads_cuda = torch.autograd.grad(out_cuda.square().sum(), [h, *m.parameters()])
    m.backend = "builtin"
    out_torch = m(h)
    grads_torch = torch.autograd.grad(out_torch.square().sum(), [h, *m.parameters()])
    torch.testing.assert_close(out_cuda, out_torch, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_cuda, grads_torch):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert math.isfinite(out_cuda.sum().item())
