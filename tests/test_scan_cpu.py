"""The fused numba CPU scan (salmm.model.scan_cpu): every argument combination against the
sequential reference, against the chunked PyTorch scan, determinism, gradcheck, its exp, the
implementation switch, and the whole model on either implementation."""

import functools
import itertools
import math

import numba
import numpy as np
import pytest
import torch
from numba.extending import intrinsic

import salmm.model.mamba
import salmm.model.scan
from salmm.model import numba_math, scan_cpu
from salmm.model.net import SalMM
from salmm.model.scan import resolve_impl, selective_scan, selective_scan_ref
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)
from tests.test_model import small_batch

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
PER_GROUP = ("A", "D", "delta_bias")  # no batch dim


def scan_inputs(batch, groups, dim, length, n, dtype, seed, softplus=True):
    """Random leaf inputs; groups=None: no group dim. Without softplus, delta and the bias
    are positive (a negative time step makes the state grow without bound)."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if groups is None else (groups,)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    inputs = {
        "u": rand(batch, *lead, dim, length),
        "delta": rand(batch, *lead, dim, length, scale=0.5),
        "A": -torch.exp(rand(*lead, dim, n)),
        "B": rand(batch, *lead, n, length),
        "C": rand(batch, *lead, n, length),
        "D": rand(*lead, dim),
        "z": rand(batch, *lead, dim, length),
        "delta_bias": rand(*lead, dim, scale=0.5),
    }
    if not softplus:
        inputs["delta"], inputs["delta_bias"] = inputs["delta"].abs(), inputs["delta_bias"].abs()
    return {k: v.requires_grad_() for k, v in inputs.items()}


def reference(inputs, softplus):
    """The sequential loop, once per group (it has no group dim) when there is one."""
    if inputs["u"].ndim == 3:
        return selective_scan_ref(**inputs, delta_softplus=softplus)
    outs = [
        selective_scan_ref(
            **{k: v[g] if k in PER_GROUP else v[:, g] for k, v in inputs.items()},
            delta_softplus=softplus,
        )
        for g in range(inputs["u"].shape[1])
    ]
    return torch.stack(outs, dim=1)


def outputs_and_grads(fn, inputs, grad_out):
    out = fn(inputs)
    return [out, *torch.autograd.grad(out, list(inputs.values()), grad_out)]


def assert_all_close(got, want, tol, names):
    for name, a, b in zip(["out", *names], got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "grouped"])
@pytest.mark.parametrize(
    "batch, length", [(1, 1), (1, 2), (2, 33), (1, 33)], ids=["b1-l1", "b1-l2", "b2-l33", "b1-l33"]
)
@pytest.mark.parametrize(
    "options",
    list(itertools.product([False, True], repeat=4)),
    ids=lambda o: "-".join(n for n, on in zip(["D", "z", "bias", "softplus"], o) if on) or "bare",
)
def test_numba_scan_matches_sequential_loop(dtype, groups, batch, length, options):
    """Outputs and the gradient of every input, with each optional argument on and off."""
    with_d, with_z, with_bias, softplus = options
    inputs = scan_inputs(batch, groups, 3, length, 4, dtype, seed=length, softplus=softplus)
    for name, keep in (("D", with_d), ("z", with_z), ("delta_bias", with_bias)):
        if not keep:
            del inputs[name]
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs["u"].shape, dtype=dtype, generator=gen)
    got = outputs_and_grads(
        lambda x: selective_scan(**x, delta_softplus=softplus, impl="numba"), inputs, grad_out
    )
    want = outputs_and_grads(lambda x: reference(x, softplus), inputs, grad_out)
    assert got[0].dtype == dtype and got[0].shape == inputs["u"].shape
    assert_all_close(got, want, TOLERANCE[dtype], list(inputs))


@pytest.mark.parametrize("batch, groups", [(2, 2), (1, None)])
def test_numba_scan_matches_torch_scan_at_model_widths(batch, groups):
    """d_inner 12, d_state 16 as in SalMM's Mamba blocks, float32."""
    inputs = scan_inputs(batch, groups, 12, 100, 16, torch.float32, seed=5)
    grad_out = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(2))
    got, want = (
        outputs_and_grads(
            lambda x, impl=impl: selective_scan(**x, delta_softplus=True, impl=impl),
            inputs,
            grad_out,
        )
        for impl in ("numba", "torch")
    )
    assert_all_close(got, want, 1e-5, list(inputs))


def test_numba_scan_broadcasts_over_groups():
    """A [d, n], D and delta_bias [d], B and C [b, 1, n, l] shared by both groups."""
    inputs = scan_inputs(2, 2, 3, 17, 4, torch.float64, seed=3)
    with torch.no_grad():
        shared = {
            "A": inputs["A"][0].clone(),
            "B": inputs["B"][:, :1].clone(),
            "C": inputs["C"][:, :1].clone(),
            "D": inputs["D"][0].clone(),
            "delta_bias": inputs["delta_bias"][0].clone(),
        }
    inputs.update({k: v.requires_grad_() for k, v in shared.items()})
    full = {"A": (2, 3, 4), "B": (2, 2, 4, 17), "C": (2, 2, 4, 17), "D": (2, 3)}
    full["delta_bias"] = full["D"]
    grad_out = torch.randn(inputs["u"].shape, dtype=torch.float64)
    got = outputs_and_grads(
        lambda x: selective_scan(**x, delta_softplus=True, impl="numba"), inputs, grad_out
    )
    want = outputs_and_grads(
        lambda x: reference({k: v.expand(full[k]) if k in full else v for k, v in x.items()}, True),
        inputs,
        grad_out,
    )
    assert got[3].shape == (3, 4) and got[4].shape == (2, 1, 4, 17)
    assert_all_close(got, want, 1e-10, list(inputs))


def test_numba_scan_takes_non_contiguous_and_mixed_dtype_inputs():
    """Time-major B and u (transposed views), C in float32: cast to u's compute dtype."""
    inputs = scan_inputs(2, None, 3, 9, 4, torch.float64, seed=4)
    with torch.no_grad():
        mixed = dict(
            inputs,
            u=inputs["u"].transpose(1, 2).contiguous().transpose(1, 2),
            B=inputs["B"].transpose(1, 2).contiguous().transpose(1, 2),
            C=inputs["C"].float(),
        )
    assert not mixed["u"].is_contiguous() and not mixed["B"].is_contiguous()
    got = selective_scan(**mixed, delta_softplus=True, impl="numba")
    want = selective_scan(**mixed, delta_softplus=True, impl="torch")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_numba_scan_is_deterministic_and_independent_of_threads():
    """Bitwise equal outputs and gradients on repeated calls and at 1 or 2 threads."""
    inputs = scan_inputs(3, 2, 12, 64, 16, torch.float32, seed=6)
    grad_out = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(3))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 1, 2, 2):
            torch.set_num_threads(threads)
            results.append(
                outputs_and_grads(
                    lambda x: selective_scan(**x, delta_softplus=True, impl="numba"),
                    inputs,
                    grad_out,
                )
            )
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_numba_scan_one_row_splits_channels_over_threads():
    """batch 1 without groups: the forward kernel cuts the channels between threads."""
    inputs = scan_inputs(1, None, 5, 40, 4, torch.float64, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = selective_scan(**inputs, delta_softplus=True, impl="numba")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, reference(inputs, True), rtol=1e-10, atol=1e-10)


def test_numba_scan_gradcheck():
    inputs = scan_inputs(1, 2, 2, 5, 3, torch.float64, seed=8)
    names = list(inputs)

    def fn(*tensors):
        return selective_scan(**dict(zip(names, tensors)), delta_softplus=True, impl="numba")

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


def _elementwise(function):
    """A numba loop applying ``function`` elementwise."""
    @numba.njit
    def loop(x, out):
        for i in range(x.shape[0]):
            out[i] = function(x[i])
    return loop


@numba.njit(inline="always")
def _exp(x):
    return numba_math.exp(x)


def _decay_body(ops, k, scalars):
    ops.store(ops.decay(ops.load(0, k)), 1, k)
    return ()


def _vector_decay(straight: bool):
    """A numba loop applying the scans' vector decay (:meth:`numba_math.StateOps.decay`) to
    every row of x [R, n] into out: n = 16 in one vector (``straight``), else masked vectors."""
    @intrinsic
    def decay_row(typingctx, x, out, rows):
        return numba_math.state_vectors(_decay_body, 2, 0, straight, (x, out, rows))

    @numba.njit
    def loop(x, out):
        for r in range(x.shape[0]):
            decay_row(x, out, (r, r))
    return loop


@numba.njit(inline="always")
def _softplus(x):
    return numba_math.softplus(x)[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("states", [16, 20])
def test_kernel_decay_within_2_ulp_and_zero_below_the_normal_range(dtype, states):
    """The decay factor exp(x), x <= 0, of the scans' vector code (one vector of 16 states, or
    masked vectors for 20): 2 ulp wherever exp(x) is a normal number, 0 (not a subnormal)
    below, NaN kept, exp(0) = 1."""
    info = np.finfo(dtype)
    x = np.concatenate([np.linspace(math.log(info.smallest_subnormal) - 5, 0.0, 200_001),
                        -np.abs(np.random.default_rng(0).standard_normal(50_000)) * 5,
                        [np.nan, -np.inf, 0.0, -0.0]]).astype(dtype)
    rows = np.zeros(-(-x.shape[0] // states) * states, dtype=dtype)
    rows[:x.shape[0]] = x
    out = np.full_like(rows, 7.0)
    _vector_decay(states == numba_math.LANES)(rows.reshape(-1, states), out.reshape(-1, states))
    got = out[:x.shape[0]]
    with np.errstate(under="ignore"):
        want = np.exp(x.astype(np.longdouble))
    normal = want >= info.tiny
    ulp = np.spacing(want[normal].astype(dtype)).astype(np.longdouble)
    assert (np.abs(got[normal] - want[normal]) <= 2 * ulp).all()
    below = ~normal & ~np.isnan(x)
    assert below.sum() > 1000 and (got[below] <= info.tiny).all() and (got[below] >= 0).all()
    assert np.isnan(got[-4]) and got[-3] == 0 and got[-2] == got[-1] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_exp_within_2_ulp(dtype):
    """The polynomial exp behind softplus and SiLU, over the whole range, subnormal results,
    overflow and the special values."""
    info = np.finfo(dtype)
    lo, hi = math.log(info.smallest_subnormal), math.log(info.max)
    x = np.concatenate(
        [
            np.linspace(lo - 5, hi + 5, 200_001),
            np.random.default_rng(0).standard_normal(50_000) * 5,
            [np.nan, np.inf, -np.inf, 0.0, -0.0],
        ]
    ).astype(dtype)
    got = np.empty_like(x)
    _elementwise(_exp)(x, got)
    with np.errstate(over="ignore", under="ignore"):
        want = np.exp(x.astype(np.longdouble))
    normal = (want >= info.tiny) & (want <= info.max)
    ulp = np.spacing(want[normal].astype(dtype)).astype(np.longdouble)
    assert (np.abs(got[normal] - want[normal]) <= 2 * ulp).all()
    subnormal = (want > 0) & (want < info.tiny)
    assert (np.abs(got[subnormal] - want[subnormal]) <= 2 * info.smallest_subnormal).all()
    assert (got[want > info.max] == np.inf).all()
    assert np.isnan(got[-5]) and got[-4] == np.inf and got[-3] == 0 and got[-2] == got[-1] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_softplus_within_4_ulp_and_passes_through_above_the_threshold(dtype):
    """softplus of the kernels (its series cut per type) against log1p(exp(x)) in long double:
    4 ulp over [-40, 40] (float32 as torch's own: 3), x itself above 20 as torch, and the
    special values."""
    x = np.concatenate([np.linspace(-40.0, 40.0, 400_001),
                        np.random.default_rng(0).standard_normal(50_000) * 4,
                        [np.nan, np.inf, -np.inf, 0.0]]).astype(dtype)
    got = np.empty_like(x)
    _elementwise(_softplus)(x, got)
    exact = x.astype(np.longdouble)
    with np.errstate(over="ignore"):
        want = np.where(exact > numba_math.SOFTPLUS_THRESHOLD, exact, np.log1p(np.exp(exact)))
    finite = np.isfinite(want)
    ulp = np.spacing(want[finite].astype(dtype)).astype(np.longdouble)
    assert (np.abs(got[finite] - want[finite]) <= 4 * ulp).all()
    assert np.isnan(got[-4]) and got[-3] == np.inf and got[-2] == 0
    assert abs(got[-1] - dtype(math.log(2))) <= np.spacing(dtype(math.log(2)))


def test_workspace_reuses_only_buffers_nothing_refers_to():
    """decay / state buffers: not handed out twice while a tensor, a view or an autograd
    graph still holds them; unused ones dropped beyond the budget."""
    workspace = scan_cpu.Workspace(budget=100)
    a = workspace.take((2, 3), torch.float32)
    b = workspace.take((2, 3), torch.float32)
    assert a.data_ptr() != b.data_ptr() and a.dtype == torch.float32
    address = a.data_ptr()
    del a
    c = workspace.take((2, 3), torch.float32)
    assert c.data_ptr() == address
    view = c[0]
    del c
    assert workspace.take((2, 3), torch.float32).data_ptr() != address  # the view holds it
    x = torch.ones(6, dtype=torch.float64, requires_grad=True)
    saved = workspace.take((6,), torch.float64).fill_(2.0)
    loss = (x * saved).sum()  # the graph saves the buffer
    address = saved.data_ptr()
    del saved
    assert workspace.take((6,), torch.float64).data_ptr() != address
    loss.backward()
    assert torch.equal(x.grad, torch.full((6,), 2.0, dtype=torch.float64))
    del view, b, loss
    workspace.take((50, 50), torch.float32)
    spare = [a.nbytes for a in workspace.arrays[:-1]]
    assert sum(spare) <= 100


def test_impl_switch(monkeypatch):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert resolve_impl("auto", cpu) == "numba" and resolve_impl("torch", cpu) == "torch"
    assert resolve_impl("auto", meta) == "torch"
    with pytest.raises(RuntimeError, match="numba"):
        resolve_impl("numba", meta)
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", cpu)
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA"):
        resolve_impl("triton", cpu)            # outside Triton's interpreter
    inputs = scan_inputs(1, None, 2, 4, 3, torch.float32, seed=9)
    with pytest.raises(ValueError, match="chunk_len"):
        selective_scan(**inputs, chunk_len=8, impl="numba")
    monkeypatch.setattr(salmm.model.scan, "_scan_cpu", lambda: None)  # as if numba did not import
    assert resolve_impl("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="numba"):
        resolve_impl("numba", cpu)


def model_step(dtype):
    torch.manual_seed(0)
    model = SalMM(backend="builtin")
    with torch.no_grad():  # away from the init, where the Mamba blocks barely matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.CrossModelAtt.gamma.fill_(0.5)  # let the embedding reach the output
    model.to(dtype)
    frames, emb = small_batch(batch=1, h=64, w=64)
    out = model(frames.to(dtype), emb.to(dtype))
    out.mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_on_numba_scan_equals_torch_scan(monkeypatch):
    """SalMM forward + backward on the default CPU path (numba) against the PyTorch scan:
    float32 outputs, and in float64 (where rounding does not drown the comparison after
    the batch norms) outputs and every parameter gradient."""
    runs = {dtype: model_step(dtype) for dtype in (torch.float32, torch.float64)}
    torch_scan = functools.partial(selective_scan, impl="torch")
    monkeypatch.setattr(salmm.model.mamba, "selective_scan", torch_scan)
    out, _ = model_step(torch.float32)
    torch.testing.assert_close(runs[torch.float32][0], out, rtol=1e-5, atol=1e-5)
    out, grads = model_step(torch.float64)
    torch.testing.assert_close(runs[torch.float64][0], out, rtol=1e-10, atol=1e-12)
    for name, grad in runs[torch.float64][1].items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-9, atol=1e-14, msg=name)
