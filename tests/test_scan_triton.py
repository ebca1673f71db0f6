"""The Triton selective scan (salmm.model.scan_triton) against a sequential loop written here,
forward and backward, run on the CPU through Triton's interpreter: the GPU kernels' logic,
tested on every landing.

Triton decides at import whether its kernels are interpreted (``TRITON_INTERPRET=1``), for the
whole process, so these tests run in a process of their own that starts with it set
(:func:`test_the_kernels_in_an_interpreter_process`); in the main test process they are
skipped, and nothing else there runs interpreted."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import salmm.model.mamba as mamba_module
from salmm.model import scan as scan_module
from salmm.model.mamba import Mamba, scan_backend
from salmm.model.scan import resolve_impl, selective_scan
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in its own process with"
                                 " TRITON_INTERPRET=1 (test_the_kernels_in_an_interpreter_process)")
BLOCK_L = 16  # salmm.model.scan_triton.BLOCK_L, checked in the interpreter process


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter process")
def test_the_kernels_in_an_interpreter_process():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parents[1],
        capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "9 passed, 1 skipped" in result.stdout, result.stdout[-2000:]


@interpreted
def test_block_length_is_the_kernels():
    from salmm.model.scan_triton import BLOCK_L as kernels

    assert kernels == BLOCK_L


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=True):
    """The recurrence step by step for grouped inputs (u [b, g, d, l], A [g, d, n], ...)."""
    dt = delta + (0 if delta_bias is None else delta_bias[..., None])
    dt = F.softplus(dt) if softplus else dt
    h = u.new_zeros(*u.shape[:-1], A.shape[-1])  # [b, g, d, n]
    out = []
    for t in range(u.shape[-1]):
        dt_t = dt[..., t, None]
        h = torch.exp(dt_t * A) * h + dt_t * B[..., None, :, t] * u[..., t, None]
        y = (h * C[..., None, :, t]).sum(-1) + (0 if D is None else D * u[..., t])
        out.append(y if z is None else y * F.silu(z[..., t]))
    return torch.stack(out, -1)


def inputs(batch, groups, dim, length, n, dtype, seed, optional=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    values = {
        "u": rand(batch, groups, dim, length),
        "delta": rand(batch, groups, dim, length, scale=0.5),
        "A": -torch.exp(rand(groups, dim, n)),
        "B": rand(batch, groups, n, length),
        "C": rand(batch, groups, n, length),
        "D": rand(groups, dim),
        "z": rand(batch, groups, dim, length),
        "delta_bias": rand(groups, dim, scale=0.5),
    }
    if not optional:
        values.update(D=None, z=None, delta_bias=None)
    return {k: None if v is None else v.requires_grad_() for k, v in values.items()}


def forward_backward(fn, values, grad_out=None):
    out = fn(values)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    present = [k for k in NAMES if values[k] is not None]
    grads = torch.autograd.grad(out, [values[k] for k in present], grad_out)
    return out, dict(zip(present, grads)), grad_out


def triton(values, softplus=True):
    return selective_scan(**values, delta_softplus=softplus, impl="triton")


@interpreted
@pytest.mark.parametrize("length", [1, BLOCK_L + 1, 2 * BLOCK_L + 7])
def test_triton_scan_matches_loop_float64(length):
    """Both directions (two groups) of an odd-width block, lengths within and across chunks."""
    values = inputs(2, 2, 5, length, 3, torch.float64, seed=length)
    out, grads, grad_out = forward_backward(triton, values)
    ref, ref_grads, _ = forward_backward(lambda v: loop(**v), values, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-9, msg=name)


@interpreted
def test_triton_scan_without_options_or_softplus():
    """No D, gate or bias; dt given directly (positive), several channel blocks (d = 20 > 16)."""
    values = inputs(1, 1, 20, 40, 2, torch.float64, seed=3, optional=False)
    with torch.no_grad():
        values["delta"].abs_()
    run = functools.partial(triton, softplus=False)
    out, grads, grad_out = forward_backward(run, values)
    ref, ref_grads, _ = forward_backward(lambda v: loop(**v, softplus=False), values, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-9, msg=name)


@interpreted
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
def test_triton_scan_low_precision_inputs(dtype, tol):
    """float32 / bf16 inputs with a float32 state: equal to the float64 loop on the same
    (rounded) inputs within the output dtype's rounding; outputs and gradients keep the
    inputs' dtypes."""
    values = inputs(2, 2, 6, BLOCK_L + 9, 4, dtype, seed=7)
    out, grads, grad_out = forward_backward(triton, values)
    wide = {k: v.detach().double().requires_grad_() for k, v in values.items()}
    ref, ref_grads, _ = forward_backward(lambda v: loop(**v), wide, grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item() + 1
        torch.testing.assert_close(grads[name].double() / scale, grad / scale, rtol=tol,
                                   atol=tol, msg=name)


@interpreted
def test_bidirectional_mamba_on_triton_equals_chunked_scan(monkeypatch):
    """A whole bidirectional Mamba block (the call SalM^2 makes: both directions as one
    grouped scan, the backward one on the flipped sequence) on the Triton scan equals the same
    block on the chunked PyTorch scan, output and every parameter's gradient."""
    torch.manual_seed(0)
    block = Mamba(6, d_state=16, backend="builtin").double()
    x = torch.randn(2, 45, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for impl in ("triton", "torch"):
        monkeypatch.setattr(mamba_module, "selective_scan",
                            functools.partial(selective_scan, impl=impl))
        out = block(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


@interpreted
def test_scan_choice_per_device(monkeypatch):
    """auto: numba on CPU; Triton on CUDA, the chunked scan where Triton does not import;
    mamba-ssm's kernels first where they are there. impl='triton' on a CPU outside the
    interpreter is refused."""
    cuda = torch.device("cuda")
    assert resolve_impl("auto", torch.device("cpu")) == "numba"
    assert resolve_impl("auto", cuda) == "triton"
    assert scan_backend(cuda) == "triton" and scan_backend("cpu") == "numba"
    monkeypatch.setattr(mamba_module, "cuda_kernels_available", lambda: True)
    assert scan_backend(cuda) == "mamba-ssm" and scan_backend(cuda, "builtin") == "triton"
    monkeypatch.setattr(scan_module, "_scan_triton", lambda: None)
    assert scan_backend(cuda, "builtin") == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(scan_module, "_scan_triton", lambda: True)
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA"):
        resolve_impl("triton", torch.device("cpu"))
