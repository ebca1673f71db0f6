"""The fused CPU kernel of a whole SCPMamba layer for training (salmm.model.layer_train_cpu)
against its ``_ref`` twin, the layer's own modules (backend "builtin"): the output and every
gradient in float64 for each layer of the network, ties and NaN in the Inception's max-pool,
gradcheck against finite differences, float32 within rounding, threads, and when the kernel
runs."""

import pytest
import torch

from salmm.model import layer_train_cpu
from salmm.model.net import SalMM, SCPMambaLayer
from tests._gradients import assert_same_on_two_threads, gradients
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

LAYERS = {  # name: (input channels, output channels, the published Inception widths)
    "encoder4": (16, 16, [6, 2, 4, 4, 2, 4]), "encoder5": (16, 24, [9, 3, 6, 6, 3, 6]),
    "encoder6": (24, 32, [12, 4, 8, 8, 4, 8]), "decoder1": (32, 24, [9, 3, 6, 6, 3, 6]),
}


def jittered_layer(name: str, dtype=torch.float64, seed: int = 0):
    """(backend "auto", backend "builtin") layers with the same weights, every parameter moved
    off its initial value (LayerNorm gains, skip_scale, A_log, D, ...)."""
    cin, cout, dims = LAYERS[name]
    torch.manual_seed(seed)
    fast = SCPMambaLayer(cin, cout, dims, backend="auto").to(dtype)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref = SCPMambaLayer(cin, cout, dims, backend="builtin").to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_output_and_every_gradient_equal_the_modules_in_float64(name, monkeypatch):
    fast, ref = jittered_layer(name)
    calls = []
    forward = layer_train_cpu.layer_forward
    monkeypatch.setattr(layer_train_cpu, "layer_forward", lambda *a: calls.append(1) or forward(*a))
    x = torch.randn(3, LAYERS[name][0], 5, 7, dtype=torch.float64)  # odd, not square
    weight = torch.randn(3, LAYERS[name][1], 5, 7, dtype=torch.float64)
    got, want = gradients(fast, x, weight), gradients(ref, x, weight)
    assert calls == [1]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert (got[0] - want[0]).abs().max() < 1e-10
    assert (got[1] - want[1]).abs().max() < 1e-10
    assert got[2].keys() == want[2].keys()
    for key in want[2]:
        assert (got[2][key] - want[2][key]).abs().max() < 1e-9, key


def test_max_pool_ties_and_nan_route_the_gradient_as_torch_does():
    """A constant patch (every window tied) and a NaN in the input: the Inception's max-pool
    sends each window's gradient where PyTorch's does (first maximum in raster order, last
    NaN), which the pool branch's weight gradient shows."""
    fast, ref = jittered_layer("encoder4")
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    x[0, :, 1:5, 1:5] = 0.5
    weight = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    got, want = gradients(fast, x, weight), gradients(ref, x, weight)
    key = "Inception.branch4.1.conv.weight"
    assert (got[1] - want[1]).abs().max() < 1e-10
    assert (got[2][key] - want[2][key]).abs().max() < 1e-9
    x[1, 3, 2, 2] = float("nan")
    got, want = gradients(fast, x, weight), gradients(ref, x, weight)
    assert torch.equal(got[1][0].isnan(), want[1][0].isnan())
    assert (got[1][0] - want[1][0]).abs().max() < 1e-10  # the frame without NaN is unharmed
    assert got[1][1].isnan().any() and want[1][1].isnan().any()


def test_gradcheck_against_finite_differences():
    fast, _ = jittered_layer("encoder4", seed=3)
    params = dict(fast.named_parameters())
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp, *tensors):
        with torch.nn.utils.stateless._reparametrize_module(fast, dict(zip(params, tensors))):
            return layer_train_cpu.layer_forward(fast, inp)

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-6)


def test_float32_within_rounding():
    fast, ref = jittered_layer("encoder5", dtype=torch.float32)
    x, weight = torch.randn(2, 16, 8, 8), torch.randn(2, 24, 8, 8)
    got, want = gradients(fast, x, weight), gradients(ref, x, weight)
    assert (got[0] - want[0]).abs().max() < 1e-4
    assert (got[1] - want[1]).abs().max() / want[1].abs().max() < 1e-4
    for key in want[2]:
        scale = want[2][key].abs().max() + 1e-6
        assert (got[2][key] - want[2][key]).abs().max() / scale < 1e-3, key


def test_results_do_not_depend_on_threads():
    """Frames are claimed by up to torch.get_num_threads() threads; each frame's weight
    gradients have their own buffer, summed in frame order."""
    fast, _ = jittered_layer("encoder6", dtype=torch.float32)
    x, weight = torch.randn(5, 24, 4, 4), torch.randn(5, 32, 4, 4)
    assert_same_on_two_threads(fast, x, weight)


def test_a_second_derivative_is_refused_not_silently_zero():
    fast, _ = jittered_layer("decoder1")
    x = torch.randn(1, 32, 2, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer_train_cpu.layer_forward(fast, x).sum(), x,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grad.sum(), x)


def test_inference_and_the_builtin_backend_do_not_run_it(monkeypatch):
    monkeypatch.setattr(layer_train_cpu, "layer_forward", lambda *a: pytest.fail("kernel ran"))
    model = SalMM(backend="auto").eval()
    x, e = torch.rand(1, 3, 32, 32), torch.randn(1, 512)
    with torch.no_grad():
        model(x, e)
    builtin = SalMM(backend="builtin")
    builtin(x, e).mean().backward()
