"""Gradients of a module's weighted output, and the check that they do not depend on the
thread count (the fused CPU kernels' tests)."""

import torch


def gradients(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """(output, dL/dx, {name: dL/dparameter}) for L = sum(module(x) * weight)."""
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    out = module(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {k: p.grad.clone() for k, p in module.named_parameters()}


def assert_same_on_two_threads(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """The output and every gradient bit for bit the same on one and on two threads (the
    caller runs on one)."""
    one = gradients(module, x, weight)
    torch.set_num_threads(2)
    try:
        two = gradients(module, x, weight)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert one[2].keys() == two[2].keys()
    assert all(torch.equal(one[2][k], two[2][k]) for k in one[2])
