"""Both selective scan implementations (numba on CPU, chunked PyTorch) against a plain
sequential loop written here."""

import pytest
import torch
import torch.nn.functional as F

from salmm.model.scan import selective_scan, selective_scan_export, selective_scan_ref
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
IMPLS = ["numba", "torch"]


def loop_oracle(u, delta, A, B, C, D, z, delta_bias):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; y_t = C_t . h_t + D u_t; out = y silu(z)."""
    dt = F.softplus(delta + delta_bias[:, None])  # [b, d, l]
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    out = []
    for t in range(length):
        dt_t = dt[:, :, t, None]  # [b, d, 1]
        h = torch.exp(dt_t * A) * h + dt_t * B[:, None, :, t] * u[:, :, t, None]
        y_t = (h * C[:, None, :, t]).sum(-1) + D * u[:, :, t]
        out.append(y_t * F.silu(z[:, :, t]))
    return torch.stack(out, dim=-1)


def make_inputs(batch, dim, length, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    A = (-torch.exp(torch.randn(dim, n, generator=gen, dtype=dtype))).requires_grad_()
    return {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length, scale=0.5),
        "A": A,
        "B": rand(batch, n, length),
        "C": rand(batch, n, length),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": rand(dim, scale=0.5),
    }


def run(fn, inputs, grad_out, **kwargs):
    out = fn(**inputs) if fn is loop_oracle else fn(**inputs, delta_softplus=True, **kwargs)
    grads = torch.autograd.grad(out, [inputs[k] for k in NAMES], grad_out)
    return out, dict(zip(NAMES, grads))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"]
)
@pytest.mark.parametrize("length", [1, 2, 7, 16, 61, 128])
def test_vectorised_scan_matches_loop(dtype, tol, length, impl):
    inputs = make_inputs(2, 3, length, 4, dtype, seed=length)
    grad_out = torch.randn(2, 3, length, dtype=dtype, generator=torch.Generator().manual_seed(1))
    want, want_grads = run(loop_oracle, inputs, grad_out)
    got, got_grads = run(selective_scan, inputs, grad_out, impl=impl)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name in NAMES:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol, msg=name)


def test_reference_loop_matches_oracle():
    inputs = make_inputs(2, 3, 33, 4, torch.float64, seed=5)
    grad_out = torch.randn(2, 3, 33, dtype=torch.float64)
    want, want_grads = run(loop_oracle, inputs, grad_out)
    got, got_grads = run(selective_scan_ref, inputs, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in NAMES:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_optional_arguments_and_no_softplus(impl):
    inputs = make_inputs(2, 3, 9, 4, torch.float64, seed=3)
    kwargs = {k: inputs[k] for k in ["u", "delta", "A", "B", "C"]}
    want = selective_scan_ref(**kwargs)
    torch.testing.assert_close(selective_scan(**kwargs, impl=impl), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_memory_is_kept(impl):
    """With tiny steps the state decays slowly; a pulse at t=0 must reach the last step."""
    length = 257
    u = torch.zeros(1, 1, length, dtype=torch.float64)
    u[..., 0] = 1.0
    delta = torch.full((1, 1, length), 1e-3, dtype=torch.float64)
    A = -torch.ones(1, 1, dtype=torch.float64)
    B = torch.ones(1, 1, length, dtype=torch.float64)
    y = selective_scan(u, delta, A, B, B.clone(), impl=impl)
    expected = 1e-3 * torch.exp(torch.tensor(-1e-3 * (length - 1), dtype=torch.float64))
    torch.testing.assert_close(y[0, 0, -1], expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_input_is_computed_in_float32_and_cast_back(impl):
    inputs = make_inputs(1, 2, 10, 4, torch.float32, seed=2)
    half = {k: v.detach().half() for k, v in inputs.items()}
    out = selective_scan(**half, delta_softplus=True, impl=impl)
    assert out.dtype == torch.float16
    want = selective_scan_ref(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("chunk_len", [1, 2, 3, 8])
def test_chunk_boundaries_carry_state_and_gradient(chunk_len):
    inputs = make_inputs(2, 3, 21, 4, torch.float64, seed=7)
    grad_out = torch.randn(2, 3, 21, dtype=torch.float64)
    want, want_grads = run(loop_oracle, inputs, grad_out)
    out = selective_scan(**inputs, delta_softplus=True, chunk_len=chunk_len, impl="torch")
    got_grads = torch.autograd.grad(out, [inputs[k] for k in NAMES], grad_out)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for name, got in zip(NAMES, got_grads):
        torch.testing.assert_close(got, want_grads[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_twice_with_retained_graph_gives_same_grads(impl):
    inputs = make_inputs(1, 2, 8, 4, torch.float64, seed=4)
    out = selective_scan(**inputs, delta_softplus=True, impl=impl).sum()
    first = torch.autograd.grad(out, list(inputs.values()), retain_graph=True)
    second = torch.autograd.grad(out, list(inputs.values()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_group_dim_equals_separate_scans(impl):
    """[b, g, d, l] inputs with per-group A, D, delta_bias: one call == g separate calls."""
    groups = [make_inputs(2, 3, 13, 4, torch.float64, seed=s) for s in (11, 12)]
    stacked = {
        k: torch.stack([g[k] for g in groups], dim=0 if k in ("A", "D", "delta_bias") else 1)
        for k in NAMES
    }
    out = selective_scan(**stacked, delta_softplus=True, impl=impl)
    assert out.shape == (2, 2, 3, 13)
    grads = torch.autograd.grad(out.square().sum(), [g[k] for g in groups for k in NAMES])
    for i, g in enumerate(groups):
        want = selective_scan_ref(**g, delta_softplus=True)
        torch.testing.assert_close(out[:, i], want, rtol=1e-12, atol=1e-12)
        want_grads = torch.autograd.grad(want.square().sum(), [g[k] for k in NAMES])
        for got, exp in zip(grads[i * len(NAMES) : (i + 1) * len(NAMES)], want_grads):
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def adversarial_inputs(case, dtype):
    """Inputs that stress the decays: 70 steps (three chunks of 32, the last one padded)."""
    inputs = make_inputs(2, 3, 70, 16, dtype, seed=3)
    mamba_init_a = -torch.arange(1, 17, dtype=dtype).repeat(3, 1)  # -exp(A_log) at init
    with torch.no_grad():
        if case == "huge_steps":  # dt = softplus(30 + bias) ~ 30: every decay underflows to 0
            inputs["delta"].fill_(30.0)
            inputs["A"].copy_(mamba_init_a)
        elif case == "mixed_steps":  # dt from ~1e-9 to ~40 within one sequence
            inputs["delta"].mul_(20.0)
        elif case == "mamba_init":
            inputs["delta"].mul_(4.0)
            inputs["A"].copy_(mamba_init_a)
    return inputs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"]
)
@pytest.mark.parametrize("case", ["huge_steps", "mixed_steps", "mamba_init"])
def test_adversarial_decays_match_loop(dtype, tol, case, impl):
    inputs = adversarial_inputs(case, dtype)
    grad_out = torch.randn(2, 3, 70, dtype=dtype, generator=torch.Generator().manual_seed(2))
    want, want_grads = run(loop_oracle, inputs, grad_out)
    got, got_grads = run(selective_scan, inputs, grad_out, impl=impl)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name in NAMES:
        assert torch.isfinite(got_grads[name]).all(), name
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)], ids=["float32", "float64"]
)
def test_sequence_result_does_not_depend_on_its_batch(dtype, tol, impl):
    """Same chunking whatever the batch: one sequence alone equals it inside a batch of
    three (up to rounding in the vectorised kernels)."""
    inputs = make_inputs(3, 5, 100, 16, dtype, seed=9)
    batched = selective_scan(**inputs, delta_softplus=True, impl=impl)
    alone = {k: v[1:2] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    torch.testing.assert_close(
        selective_scan(**alone, delta_softplus=True, impl=impl), batched[1:2], rtol=tol, atol=tol
    )


# ---- the export scan (forward only, traceable) ---------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 4, 10, 61, 1024])
def test_export_scan_matches_the_loop(length):
    """float64 to 1e-7: the one difference is the per-step log-decay floor at -20, e^-20 of a
    state beside its drive."""
    inputs = {k: v.detach() for k, v in make_inputs(2, 3, length, 16, torch.float64,
                                                    seed=length).items()}
    want = loop_oracle(**inputs)
    got = selective_scan_export(**inputs, delta_softplus=True)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    single = {k: v.float() for k, v in inputs.items()}
    torch.testing.assert_close(selective_scan_export(**single, delta_softplus=True),
                               want.float(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["huge_steps", "mixed_steps", "mamba_init"])
def test_export_scan_survives_adversarial_decays(case):
    inputs = {k: v.detach() for k, v in adversarial_inputs(case, torch.float32).items()}
    got = selective_scan_export(**inputs, delta_softplus=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, loop_oracle(**inputs), rtol=1e-5, atol=1e-5)


def test_export_scan_takes_leading_group_dims():
    groups = [{k: v.detach() for k, v in make_inputs(2, 3, 13, 4, torch.float64, seed=s).items()}
              for s in (11, 12)]
    stacked = {k: torch.stack([g[k] for g in groups], dim=0 if k in ("A", "D", "delta_bias")
                              else 1) for k in NAMES}
    out = selective_scan_export(**stacked, delta_softplus=True)
    for i, g in enumerate(groups):
        torch.testing.assert_close(out[:, i], selective_scan_ref(**g, delta_softplus=True),
                                   rtol=1e-7, atol=1e-7)
