"""The fused CPU inference kernels (salmm.model.layer_cpu, salmm.model.maps_cpu) against their
``_ref`` twin, the model module by module (Mamba backend "builtin"): in float64, where rounding
is 1e-12 and a wrong computation shows; in float32 within float32 rounding of the float64
reference; every SCPMamba layer of the network, odd sizes, NaN, weights changed in place,
threads, and when the kernels run at all."""

import math

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from salmm.model import layer_cpu, maps_cpu, net
from salmm.model.net import SalMM
from salmm.model.numba_math import gelu
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

LAYERS = {  # name: (input channels, side of its map for a 64x64 frame)
    "encoder4": (16, 8), "encoder5": (16, 4), "encoder6": (24, 2),
    "decoder1": (32, 2), "decoder2": (24, 2), "decoder3": (16, 4),
}


def jittered(backend: str, seed: int = 0) -> SalMM:
    """A SalMM whose every parameter is moved off its initial value (A_log, D, gamma, ...),
    so that no term of the computation is trivially zero or one."""
    torch.manual_seed(seed)
    model = SalMM(backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models():
    fast, ref = jittered("auto"), SalMM(backend="builtin").eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def frames(batch=2, h=64, w=64, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, h, w, generator=gen, dtype=dtype),
            torch.randn(batch, 512, generator=gen, dtype=dtype))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_layer_equals_its_modules_in_float64(models, name):
    fast, _ = models
    layer = getattr(fast, name)[0].double()
    channels, side = LAYERS[name]
    x = torch.randn(2, channels, side + 2, side + 1, dtype=torch.float64)  # odd, not square
    with torch.inference_mode():
        got = layer_cpu.layer_forward(layer, x.contiguous(memory_format=torch.channels_last))
        layer.backend = "builtin"
        want = layer(x)
        layer.backend = "auto"
    layer.float()
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max() < 1e-10


def test_whole_network_equals_its_modules_in_float64(models):
    fast, ref = models
    x, e = frames(h=96, w=64)
    with torch.inference_mode():
        got = fast.double()(x, e)
        want = ref.double()(x, e)
    fast.float(), ref.float()
    assert (got - want).abs().max() < 1e-10


def test_float32_stays_within_float32_rounding(models):
    """The kernels' float32 maps are as close to the float64 network as eager float32 is."""
    fast, ref = models
    x, e = frames()
    with torch.inference_mode():
        fast32, eager32 = fast(x.float(), e.float()).double(), ref(x.float(), e.float()).double()
        exact = ref.double()(x, e)
    ref.float()
    eager_error = (eager32 - exact).abs().max()
    assert (fast32 - exact).abs().max() <= 4 * eager_error + 1e-6


def test_smallest_frames_and_batch_of_one(models):
    """32x32 frames: the deepest maps are 1x1, shorter than the depthwise conv's taps."""
    fast, ref = models
    x, e = frames(batch=1, h=32, w=32)
    with torch.inference_mode():
        got, want = fast.double()(x, e), ref.double()(x, e)
    fast.float(), ref.float()
    assert (got - want).abs().max() < 1e-10


@pytest.mark.parametrize("resize", [None, "pool", "upsample"])
def test_group_norm_then_resize_then_gelu_and_nan_propagate_as_torch_does(resize):
    """GELU(resize(GroupNorm(x))) against the modules in float64, odd sizes (the pool drops
    the last row and column), a NaN, and written into a channel slice of a wider tensor (what
    the decoder writes into a fusion convolution's input), the other channels untouched."""
    torch.manual_seed(0)
    norm = net.GroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x[1, 3, 2, 4] = float("nan")
    with torch.inference_mode():
        want = norm(x)
        if resize == "pool":
            want = F.max_pool2d(want, 2, 2)
        if resize == "upsample":
            want = F.interpolate(want, scale_factor=2, mode="bilinear", align_corners=True)
        want = F.gelu(want)
        got = maps_cpu.group_norm_gelu(norm, x, resize)
        wide = torch.full((2, want.shape[2], want.shape[3], 11), 7.0, dtype=torch.float64)
        into = wide.permute(0, 3, 1, 2)[:, 2:10]
        written = maps_cpu.group_norm_gelu(norm, x, resize, into)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert written.data_ptr() == into.data_ptr()
    for result in (got, written):
        assert torch.equal(result.isnan(), want.isnan())
        assert result.isnan().any() and not result[0].isnan().any()
        torch.testing.assert_close(result, want, rtol=0, atol=1e-12, equal_nan=True)
    assert (wide[..., :2] == 7.0).all() and (wide[..., 10:] == 7.0).all()


def test_float32_gelu_is_within_its_rounding_of_the_exact_one():
    """The kernels' float32 GELU against x Phi(x) in float64 (Phi from erfc, which keeps the
    negative side's small values exact), on a dense grid and the specials: within 2 ulp of
    the result plus 2.5e-7 (the erfc approximation's part), and within 0.3% of it on the
    negative side down to -5 (1 + erf is not formed there, so the small values keep their
    digits: torch's float32 GELU is 0 or 100% off below -5.3); NaN stays NaN, +inf is
    +inf."""
    @numba.njit(error_model="numpy")
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = gelu(x[i])

    x = np.concatenate([np.linspace(-12.0, 12.0, 240_001), [0.0, -0.0, 1e-30, -1e-30, 1e30,
                                                             np.nan, np.inf]]).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2.0)) for v in x[:-3].astype(np.float64)])
    error = np.abs(out[:-3] - exact)
    assert (error <= 2 * np.spacing(np.abs(exact).astype(np.float32)) + 2.5e-7).all()
    negative = (x[:-3] < 0) & (x[:-3] > -5)
    assert (error[negative] <= 3e-3 * np.abs(exact[negative])).all()
    assert out[-3] == x[-3] and np.isnan(out[-2]) and out[-1] == np.inf


def test_spatial_attention_equals_the_bridge_in_float64(models):
    fast, _ = models
    bridge = fast.scab.double()
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a = bridge.satt(x)[0]
        s, mixed, pooled = maps_cpu.spatial_attention(bridge.satt.shared_conv2d[0], x)
    fast.float()
    torch.testing.assert_close(s, a * x, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed, a * x + x, rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled, (a * x + x).mean((2, 3)), rtol=0, atol=1e-12)


def bridge_pair(batch, sides):
    """({"auto": bridge, "builtin": its twin with the same random weights}, five float64 maps
    [batch, C_i, side, side + 1] in channels-last memory)."""
    torch.manual_seed(0)
    bridges = {backend: net.SCAttBridge(list(net.CHANNELS), backend).double()
               for backend in ("auto", "builtin")}
    with torch.no_grad():
        for p in bridges["auto"].parameters():
            p.normal_(0.0, 0.3)
    bridges["builtin"].load_state_dict(bridges["auto"].state_dict())
    maps = [torch.randn(batch, c, side, side + 1, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last) for c, side in zip(net.CHANNELS, sides)]
    return bridges, maps


@pytest.mark.parametrize("sides", [(10, 8, 6, 4, 2), (16, 8, 4, 2, 1)])
def test_the_bridge_in_one_kernel_equals_the_modules_in_float64(sides):
    """The inference bridge (one kernel for the five maps) against the modules, into new
    tensors and into the last channels of fusion inputs (the decoder's channels untouched; the
    modules write there too when asked), batch 3 on two threads, down to 1x1 maps."""
    bridges, maps = bridge_pair(3, sides)
    fusion = [torch.full((3, side, side + 1, 2 * c), 7.0, dtype=torch.float64).permute(
        0, 3, 1, 2) for c, side in zip(net.CHANNELS, sides)]
    modules_into = [f.clone() for f in fusion]  # (clones keep the channels-last strides)
    with torch.inference_mode():
        want = bridges["builtin"](*maps)
        written_by_modules = bridges["builtin"](*maps, fusion=modules_into)
        torch.set_num_threads(2)
        try:
            got = bridges["auto"](*maps)
            written = bridges["auto"](*maps, fusion=fusion)
        finally:
            torch.set_num_threads(1)
    for g, w, f, out, f_mod, out_mod in zip(got, want, fusion, written, modules_into,
                                            written_by_modules):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        for into, result in ((f, out), (f_mod, out_mod)):
            torch.testing.assert_close(result, w, rtol=0, atol=1e-12)
            assert result.data_ptr() == into[:, w.shape[1]:].data_ptr()
            assert (into[:, :w.shape[1]] == 7.0).all()


def test_cross_attention_in_one_kernel_equals_the_module_in_float64():
    """The CLIP cross-attention kernel against CrossModelAtt's module path: batch 2, a map
    that is not square, channels-last or not, and a NaN in the embedding (amax propagates it
    to its frame only)."""
    torch.manual_seed(0)
    modules = {backend: net.CrossModelAtt(backend=backend).double()
               for backend in ("auto", "builtin")}
    for module in modules.values():
        with torch.no_grad():
            module.gamma.fill_(0.37)
    emb = torch.randn(2, 512, dtype=torch.float64)
    emb[1, 100] = float("nan")
    feature = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    with torch.inference_mode():
        want = modules["builtin"](emb, feature)
        for layout in (torch.contiguous_format, torch.channels_last):
            got = modules["auto"](emb, feature.contiguous(memory_format=layout))
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert not got[0].isnan().any() and got[1].isnan().any()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)


def test_the_bridge_for_training_equals_the_modules_with_gradients_in_float64():
    """The whole SCAttBridge on the kernels (spatial attention forward and backward in numba)
    against the modules: outputs and the gradients of the maps and of every bridge parameter,
    with a tie for the channel maximum (its gradient is split, as torch's amax splits it)."""
    bridges, maps = bridge_pair(2, (10, 8, 6, 4, 2))
    maps[1][0, 3, 2, 2] = maps[1][0, 5, 2, 2] = maps[1][0, :, 2, 2].max() + 1.0  # a tie
    weights = [torch.randn(m.shape, dtype=torch.float64) for m in maps]
    results = {}
    for backend, bridge in bridges.items():
        leaves = [m.clone().requires_grad_(True) for m in maps]
        outs = bridge(*leaves)
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        results[backend] = ([o.detach() for o in outs] + [leaf.grad for leaf in leaves]
                            + [p.grad for p in bridge.parameters()])
    assert len(results["auto"]) == 10 + len(list(bridges["auto"].parameters()))
    for got, want in zip(results["auto"], results["builtin"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    conv = bridges["auto"].satt.shared_conv2d[0]
    x = maps[2][:1, :5, :5, :6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t, w, b: maps_cpu._SpatialAttention.apply(t, w, b, 3, 9, True),
        (x, conv.weight.detach().clone().requires_grad_(True),
         conv.bias.detach().clone().requires_grad_(True)))


def test_the_bridge_output_backward_equals_addcmul_for_a_gradient_in_any_strides():
    """The bridge's last step s + a * m: its one-kernel backward against torch.addcmul's, for
    the gradient a fusion convolution hands back (a channel slice of its input's gradient,
    through torch.cat) and for a dense one; and gradcheck in float64."""
    torch.manual_seed(0)
    s, m = (torch.randn(2, 5, 4, 3, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    a = torch.rand(2, 5, 1, 1, dtype=torch.float64)
    other = torch.randn(2, 3, 4, 3, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(2, 8, 4, 3, dtype=torch.float64)
    for sliced in (True, False):
        grads = []
        for fn in (maps_cpu.bridge_output, torch.addcmul):
            leaves = [t.clone().requires_grad_(True) for t in (s, a, m)]
            out = fn(*leaves)
            total = torch.cat([out, other], 1) if sliced else out
            (total * (weight if sliced else weight[:, :5])).sum().backward()
            grads.append([out.detach()] + [leaf.grad for leaf in leaves])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        assert grads[0][1].is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(maps_cpu.bridge_output, tuple(
        t.clone().requires_grad_(True) for t in (s, a, m)))


def test_weights_changed_in_place_are_seen(models):
    """The packed weights follow load_state_dict and in-place updates (version counters)."""
    fast, ref = models
    other = jittered("builtin", seed=5)
    x, e = frames(dtype=torch.float32)
    with torch.inference_mode():
        before = fast(x, e)
    fast.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after, want = fast(x, e), other(x, e)
    fast.load_state_dict(ref.state_dict())
    assert (after - before).abs().max() > 1e-3
    assert (after - want).abs().max() < 1e-3


def test_parameters_and_modules_replaced_or_moved_are_seen():
    """The packed weights are reused without looking the layer's tensors up again only while
    nothing is registered and the tensors' memory stays put: a parameter assigned anew, a
    submodule replaced, a parameter's memory swapped (``.data =``, what ``.to`` does) are all
    seen by the next call; an untouched layer reuses its buffer. In float64 against the
    modules."""
    torch.manual_seed(0)
    layer = jittered("auto").encoder5[0].double()
    twin = jittered("builtin").encoder5[0].double()
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)

    def both():
        with torch.inference_mode():
            got, want = layer_cpu.layer_forward(layer, x), twin(x)
        assert (got - want).abs().max() < 1e-10
        return got

    before = both()
    first = layer_cpu.pack(layer, torch.float64, 4, 4)
    assert layer_cpu.pack(layer, torch.float64, 4, 4) is first  # reused
    with torch.no_grad():
        for block in (layer, twin):
            block.mamba2.D = torch.nn.Parameter(block.mamba2.D + 0.5)
        proj = torch.nn.Linear(layer.mamba3.out_proj.in_features,
                               layer.mamba3.out_proj.out_features, dtype=torch.float64)
        layer.mamba3.out_proj = proj
        twin.mamba3.out_proj = torch.nn.Linear(proj.in_features, proj.out_features,
                                               dtype=torch.float64)
        twin.mamba3.out_proj.load_state_dict(proj.state_dict())
    replaced = both()
    assert (replaced - before).abs().max() > 1e-3
    for block in (layer, twin):
        block.mamba1.in_proj.weight.data = 3.0 * block.mamba1.in_proj.weight.data
    moved = both()
    assert (moved - replaced).abs().max() > 1e-3


def test_layer_results_do_not_depend_on_threads(models):
    """Frames are claimed by up to torch.get_num_threads() threads; each is computed alike.
    (The network's PyTorch convolutions themselves round differently with the thread count.)"""
    layer = models[0].encoder4[0]
    x = torch.randn(3, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        one = layer_cpu.layer_forward(layer, x)
        torch.set_num_threads(2)
        try:
            two = layer_cpu.layer_forward(layer, x)
        finally:
            torch.set_num_threads(1)
    assert torch.equal(one, two)
    assert torch.equal(one[1:2], layer_cpu.layer_forward(layer, x[1:2]))


def test_kernels_run_for_cpu_inference_only(models, monkeypatch):
    fast, ref = models
    calls = []
    forward = layer_cpu.layer_forward
    monkeypatch.setattr(layer_cpu, "layer_forward", lambda *a: calls.append(1) or forward(*a))
    x, e = frames(dtype=torch.float32)
    with torch.no_grad():
        fast(x, e)
    assert len(calls) == 6
    with torch.no_grad():
        ref(x, e)  # backend "builtin": module by module
    assert len(calls) == 6
    out = fast(x, e)  # autograd recording: the modules
    assert len(calls) == 6 and out.requires_grad
    out.mean().backward()
    assert fast.encoder4[0].mamba1.A_log.grad is not None
    fast.zero_grad()


def test_weights_updated_by_a_fused_optimiser_are_seen(models):
    """PyTorch's fused Adam updates weights in place without bumping their version counters
    (what a trainer validating between steps meets): the kernels still see the new values."""
    fast, ref = models
    x, e = frames(dtype=torch.float32)
    with torch.inference_mode():
        before = fast(x, e)
    optimizer = torch.optim.Adam(fast.parameters(), lr=1e-2, fused=True)
    fast(x, e).mean().backward()
    optimizer.step()
    fast.zero_grad()
    other = SalMM(backend="builtin").eval()
    other.load_state_dict(fast.state_dict())
    with torch.inference_mode():
        after, want = fast(x, e), other(x, e)
    fast.load_state_dict(ref.state_dict())
    assert (after - before).abs().max() > 1e-4
    assert (after - want).abs().max() < 1e-4


def outputs_and_gradients(fn, module, x):
    """(fn(x), and the gradients of x, module.weight and module.bias) of the loss
    sum(fn(x) * w), w a fixed ramp over [-1, 2]."""
    leaf = x.clone().requires_grad_(True)
    module.zero_grad()
    out = fn(leaf)
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view(out.shape)
    (out * weight).sum().backward()
    return out.detach(), leaf.grad, module.weight.grad.clone(), module.bias.grad.clone()


def test_saliency_head_equals_conv_upsample_sigmoid_with_gradients_in_float64(models):
    fast, _ = models
    conv = fast.final.double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    results = [outputs_and_gradients(head, conv, x) for head in (
        lambda t: maps_cpu.saliency_head(conv, t),
        lambda t: torch.sigmoid(F.interpolate(conv(t), scale_factor=2, mode="bilinear",
                                              align_corners=True)))]
    fast.float()
    assert results[0][0].shape == (2, 1, 10, 14)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t, w, b: maps_cpu._SaliencyHead.apply(t, w, b),
        (x[:1, :, :3, :4].clone().requires_grad_(True),
         conv.weight.detach().double().clone().requires_grad_(True),
         conv.bias.detach().double().clone().requires_grad_(True)))


@pytest.mark.parametrize("pool", [False, True])
def test_group_norm_for_training_equals_the_module_with_gradients_in_float64(pool):
    """GroupNorm (then the 2x2 max-pool) on the kernels against the modules: output and the
    gradients of the map and of the affine parameters; a constant patch makes every window
    over it a tie, which max-pool's backward gives to the window's first pixel."""
    torch.manual_seed(0)
    norm = net.GroupNorm(4, 12).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(3, 12, 7, 7, dtype=torch.float64)  # odd sizes: a row and a column no window covers
    x[0, :, :4, :4] = 0.5
    x = x.contiguous(memory_format=torch.channels_last)
    reference = (lambda t: F.max_pool2d(norm(t), 2, 2)) if pool else norm
    results = [outputs_and_gradients(fn, norm, x) for fn in (
        lambda t: maps_cpu.group_norm_autograd(norm, t, pool), reference)]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(  # away from the ties, where max-pool has no derivative
        lambda t, w, b: maps_cpu._GroupNorm.apply(t, w, b, 4, 1e-5, pool),
        (x[1:2, :, :4, :5].clone().requires_grad_(True),
         norm.weight.detach().clone().requires_grad_(True),
         norm.bias.detach().clone().requires_grad_(True)))


def _scan_reference(delta, u, b_t, c_t, a, backward):
    """The selective scan written out in float64 numpy, step by step: (y [d, L], the state
    after every step [L, d, n], in the direction's step order)."""
    d, length = u.shape
    h = np.zeros((d, a.shape[1]))
    y, states = np.empty((d, length)), []
    for step in range(length):
        t = length - 1 - step if backward else step
        h = np.exp(delta[:, t, None] * a) * h + (delta[:, t] * u[:, t])[:, None] * b_t[t]
        y[:, t] = h @ c_t[t]
        states.append(h)
    return y, np.stack(states)


@pytest.mark.parametrize("n", [8, 16, 20])
@pytest.mark.parametrize("backward", [False, True])
def test_the_scan_sweep_equals_the_recurrence_written_out(n, backward):
    """The forward sweep (one-vector kernel for 16 states, the general masked one otherwise)
    against the recurrence in float64 numpy: its output, and the states it keeps for training's
    backward; for 16 states the general kernel gives the same bits as the one-vector one."""
    d, length, every = 5, 37, 4
    r = np.random.default_rng(n)
    rows = lambda *shape: r.random(shape)
    args = (0.2 * rows(d, length), rows(d, length) - 0.5, rows(length, n) - 0.5,
            rows(length, n) - 0.5, -3 * rows(d, n))
    want_y, want_states = _scan_reference(*args, backward)
    kept = np.zeros((-(-length // every), d, n))
    got_y = np.empty((d, length))
    layer_cpu.sweep(*args, got_y, backward, every, kept)
    assert np.abs(got_y - want_y).max() < 1e-12 * np.abs(want_y).max()
    assert np.abs(kept[:length // every] - want_states[every - 1::every]).max() < 1e-13
    if n == layer_cpu.LANES:
        for dtype in (np.float32, np.float64):
            one = [np.empty((d, length), dtype), np.zeros(kept.shape, dtype)]
            general = [np.empty((d, length), dtype), np.zeros(kept.shape, dtype)]
            cast = [x.astype(dtype) for x in args]
            layer_cpu._sweep_lanes(*cast, one[0], backward, every, one[1])
            layer_cpu._sweep(*cast, general[0], backward, every, general[1])
            assert np.array_equal(one[1], general[1]) and np.abs(one[1]).max() > 0
            assert np.array_equal(one[0], general[0])
