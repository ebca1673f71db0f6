"""The fused CPU Mamba block for training (salmm.model.mamba_cpu) against its ``_ref`` twin,
the block's own modules (backend "builtin"): outputs and every gradient in float64 (1e-10),
gradcheck against finite differences, float32 within rounding, and the whole network's
gradients."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from salmm.model import mamba_cpu
from salmm.model.mamba import Mamba
from salmm.model.net import SalMM
from tests._gradients import assert_same_on_two_threads, gradients
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)


def jittered_block(d_model: int, seed: int = 0, dtype=torch.float64) -> tuple[Mamba, Mamba]:
    """(backend "auto", backend "builtin") blocks with the same weights, every parameter moved
    off its initial value."""
    torch.manual_seed(seed)
    fast = Mamba(d_model, backend="auto").to(dtype)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref = Mamba(d_model, backend="builtin").to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("d_model, length", [(6, 17), (2, 5), (4, 1)])
def test_output_and_every_gradient_equal_the_modules_in_float64(d_model, length):
    fast, ref = jittered_block(d_model)
    x = torch.randn(3, length, d_model, dtype=torch.float64)
    weight = torch.randn(3, length, d_model, dtype=torch.float64)
    got, want = gradients(fast, x, weight), gradients(ref, x, weight)
    assert (got[0] - want[0]).abs().max() < 1e-10
    assert (got[1] - want[1]).abs().max() < 1e-10
    assert got[2].keys() == want[2].keys() and len(got[2]) == 16  # out_proj has no bias
    for name in want[2]:
        assert (got[2][name] - want[2][name]).abs().max() < 1e-9, name


@pytest.mark.parametrize("d_state", [8, 20])
def test_other_state_sizes_equal_the_modules_in_float64(d_state):
    """A state size other than 16 runs the adjoint's general kernel (vectors in a loop, the last
    one masked) instead of the one-vector kernel SalM² uses."""
    torch.manual_seed(2)
    fast = Mamba(4, d_state=d_state, backend="auto").double()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref = Mamba(4, d_state=d_state, backend="builtin").double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 19, 4, dtype=torch.float64)
    weight = torch.randn(2, 19, 4, dtype=torch.float64)
    got, want = gradients(fast, x, weight), gradients(ref, x, weight)
    assert (got[0] - want[0]).abs().max() < 1e-10
    assert (got[1] - want[1]).abs().max() < 1e-10
    for name in want[2]:
        assert (got[2][name] - want[2][name]).abs().max() < 1e-9, name


def test_the_one_vector_adjoint_equals_the_general_one_bit_for_bit():
    """For 16 states the one-vector kernel and the general one compute the same bits."""
    d, length, n = 6, 37, mamba_cpu.LANES

    def arguments():
        r = np.random.default_rng(1)
        rows = lambda *shape: r.random(shape).astype(np.float32)
        return (rows(d, length), 0.1 * rows(d, length), rows(d, length), rows(length, n),
                rows(length, n), -rows(d, n), rows(-(-length // mamba_cpu.EVERY), d, n), True,
                *(np.zeros(shape, dtype=np.float32) for shape in
                  ((d, length), (d, length), (n, length), (n, length))), rows(d, n))

    one, general = arguments(), arguments()
    mamba_cpu._scan_backward_lanes(*one)
    mamba_cpu._scan_backward(*general)
    for got, want in zip(one[8:], general[8:]):
        assert np.array_equal(got, want)
        assert np.abs(got).max() > 0


def test_gradcheck_against_finite_differences():
    fast, _ = jittered_block(2, seed=3)
    params = dict(fast.named_parameters())

    def fn(x, *tensors):
        with torch.nn.utils.stateless._reparametrize_module(fast, dict(zip(params, tensors))):
            return mamba_cpu.mamba_forward(fast, x)

    x = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-6)


def test_float32_within_rounding_and_training_runs_the_kernels(monkeypatch):
    fast, ref = jittered_block(6, dtype=torch.float32)
    x, weight = torch.randn(2, 64, 6), torch.randn(2, 64, 6)
    calls = []
    forward = mamba_cpu.mamba_forward
    monkeypatch.setattr(mamba_cpu, "mamba_forward", lambda *a: calls.append(1) or forward(*a))
    got, want = gradients(fast, x, weight), gradients(ref, x, weight)
    assert calls == [1]
    assert (got[0] - want[0]).abs().max() < 1e-4
    for name in want[2]:
        scale = want[2][name].abs().max() + 1e-6
        assert (got[2][name] - want[2][name]).abs().max() / scale < 1e-3, name


def test_whole_network_gradients_equal_the_modules_in_float64():
    torch.manual_seed(0)
    fast = SalMM(backend="auto").double()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = SalMM(backend="builtin").double()
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    e = torch.randn(2, 512, dtype=torch.float64)
    for model in (fast, ref):
        model.zero_grad()
        model(x, e).square().mean().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max() < 1e-9, name


def test_results_do_not_depend_on_threads():
    """Rows are claimed by up to torch.get_num_threads() threads; each row's parameter
    gradients have their own buffer, summed in row order."""
    fast, _ = jittered_block(4, dtype=torch.float32)
    x, weight = torch.randn(5, 33, 4), torch.randn(5, 33, 4)
    assert_same_on_two_threads(fast, x, weight)


def test_a_second_derivative_is_refused_not_silently_zero():
    fast, _ = jittered_block(2)
    x = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fast(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grad.sum(), x)


def test_cpu_autocast_runs_the_modules():
    """Under CPU bf16 autocast (``--amp bf16`` on a CPU) the network's convolutions give bf16,
    which the float kernels do not take: training and inference then run the modules as
    autocast asks, the same numbers as backend "builtin", and the kernels are not called."""
    torch.manual_seed(0)
    fast = SalMM(backend="auto")
    ref = SalMM(backend="builtin")
    ref.load_state_dict(fast.state_dict())
    x, e = torch.rand(2, 3, 32, 32), torch.randn(2, 512)
    outs = []
    for model in (fast, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, e)
        out.float().mean().backward()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append((out.detach(), model(x, e)))
    (train, infer), (train_ref, infer_ref) = outs
    assert train.dtype == torch.bfloat16 and torch.equal(train, train_ref)
    assert torch.equal(infer, infer_ref)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name


_TRAIN_THREE_STEPS = """
import hashlib, torch
from pipeline.core import cpu
from salmm.model.net import SalMM
from salmm.training.config import TrainConfig
from salmm.training.loop import bce_loss
from salmm.training.trainer import build_optimizer
cpu.set_threads(1)
torch.manual_seed(0)
model = SalMM(backend="auto")
g = torch.Generator().manual_seed(1)
frames, emb = torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 512, generator=g)
labels = torch.rand(2, 1, 64, 64, generator=g)
optimizer = build_optimizer(TrainConfig(prepared=""), model)
for _ in range(3):
    loss = bce_loss(model(frames, emb), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
with torch.inference_mode():
    prediction = model.eval()(frames, emb)
digest = hashlib.sha256(prediction.numpy().tobytes())
for value in model.state_dict().values():
    digest.update(value.numpy().tobytes())
print(digest.hexdigest())
"""


def test_results_do_not_depend_on_whether_this_process_compiled_the_kernels(tmp_path):
    """Three training steps and a prediction, in a process that compiles every numba kernel
    (an empty cache) and in one that loads them from the cache it wrote: the same bytes. (With
    fused multiply-adds allowed, numba's in-process code and its cached code fused differently,
    and a resumed run's weights differed from an uninterrupted one's.)"""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    runs = [subprocess.run([sys.executable, "-c", _TRAIN_THREE_STEPS], cwd=repo, env=env,
                           capture_output=True, text=True, check=False) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert any((tmp_path / "numba").rglob("*.nbc")), "the first process wrote no cache"
    compiled, cached = (run.stdout.strip().splitlines()[-1] for run in runs)
    assert compiled == cached


def test_cached_kernels_are_keyed_on_every_kernel_source():
    """A kernel's cached machine code includes the numba functions it calls from other files,
    so its cache stamp covers all kernel modules (salmm.model.numba_cache): the list names
    every module of the package that caches kernels, the stamp is the sha256 of their
    sources, and every cached kernel of theirs is located with it."""
    import hashlib

    import numba

    from salmm.model import layer_cpu, layer_train_cpu, maps_cpu, numba_cache, numba_math, scan_cpu

    folder = Path(numba_cache.__file__).parent
    caching = {p.stem for p in folder.glob("*.py") if "cache=True" in p.read_text()}
    assert caching == set(numba_cache.KERNEL_MODULES)
    digest = hashlib.sha256()
    for name in numba_cache.KERNEL_MODULES:
        digest.update((folder / f"{name}.py").read_bytes())
    assert numba_cache.kernel_sources_stamp() == digest.digest()
    modules = (numba_math, scan_cpu, layer_cpu, mamba_cpu, layer_train_cpu, maps_cpu)
    kernels = [f for m in modules for f in vars(m).values()
               if isinstance(f, numba.core.registry.CPUDispatcher) and f._cache._impl is not None
               and f.__module__ == m.__name__]
    assert len(kernels) > 40
    for kernel in kernels:
        assert kernel._cache._impl.locator.get_source_stamp() == digest.digest(), kernel


def test_every_cache_location_is_keyed_on_all_kernel_sources(tmp_path, monkeypatch):
    """numba's three places for a module's cache - NUMBA_CACHE_DIR, __pycache__, the user's
    cache folder for a read-only install - each stamp the kernels with all kernel sources,
    and leave other modules' functions to numba."""
    import inspect

    import numba

    from salmm.model import numba_cache

    kernel = mamba_cpu.block_forward.py_func
    source = inspect.getfile(kernel)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "given"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))  # (the user-wide folder)
    for locator in (numba_cache._UserProvided, numba_cache._InTree, numba_cache._UserWide):
        found = locator.from_function(kernel, source)
        assert found is not None, locator
        assert found.get_source_stamp() == numba_cache.kernel_sources_stamp()
        assert locator.from_function(gradients, inspect.getfile(gradients)) is None
