"""Triton orthogonality penalty (one launch forward, one backward) against the reference.

Value and gradients under the float64-oracle rule of tests/_kernel_oracle.py, as the CPU
op's in tests/kernels/test_cpu_orth_penalty.py. Small shapes: the interpreter costs
milliseconds per program.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from elalora_kernels import reference
from _kernel_cases import orth_factors, penalty_and_grads, penalty_names
from _kernel_oracle import assert_within_eager_error, rounded

triton_backend = pytest.importorskip("elalora_kernels.triton")
triton_orth = importlib.import_module("elalora_kernels.triton.orth_penalty")  # the module (the package exports the op)

SHAPES = [(7, 5), (1, 1), (20, 7), (7, 5)]  # odd sizes, 1×1, a repeated shape


@pytest.mark.parametrize("pattern", ["r_active=1", "r_active=r_max", "scattered", "none"])
@pytest.mark.parametrize("r", [1, 7, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_and_gradients_within_eager_error_of_float64(device, dtype, r, pattern):
    Ps, Qs, actives = orth_factors(SHAPES, r, pattern)
    Ps, Qs, actives = ([t.to(device) for t in ts] for ts in (Ps, Qs, actives))
    exact_Ps, exact_Qs = ([rounded(t, dtype) for t in ts] for ts in (Ps, Qs))
    exact = penalty_and_grads(reference.orth_penalty, exact_Ps, exact_Qs, actives, torch.float64, compute_dtype=torch.float64)
    eager = penalty_and_grads(reference.orth_penalty, Ps, Qs, actives, dtype)
    ours = penalty_and_grads(triton_backend.orth_penalty, Ps, Qs, actives, dtype)
    assert ours[0].dtype == torch.float32 and all(g.dtype == dtype for g in ours[1:])
    assert_within_eager_error(ours, eager, exact, dtype, penalty_names(len(Ps)))


class _Counted:
    """A kernel whose launches (``kernel[grid](...)``) are counted."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_launch_per_direction_whatever_the_shapes(device, monkeypatch):
    forward = _Counted(triton_orth._forward_kernel)
    backward = _Counted(triton_orth._backward_kernel)
    monkeypatch.setattr(triton_orth, "_forward_kernel", forward)
    monkeypatch.setattr(triton_orth, "_backward_kernel", backward)
    Ps, Qs, actives = orth_factors(SHAPES, 4, "scattered", seed=1)
    Ps = [p.float().to(device).requires_grad_(True) for p in Ps]
    Qs = [q.float().to(device).requires_grad_(True) for q in Qs]
    actives = [a.to(device) for a in actives]
    for incoming in (1.0, -2.5):  # the incoming gradient is read on the device, whatever it is
        value = triton_backend.orth_penalty(Ps, Qs, actives, 0.1)
        grads = torch.autograd.grad(value * incoming, Ps + Qs)
        want = torch.autograd.grad(reference.orth_penalty(Ps, Qs, actives, 0.1) * incoming, Ps + Qs)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (forward.launches, backward.launches) == (2, 2)


def test_float64_and_mixed_dtypes_take_torch_ops(device):
    Ps, Qs, actives = orth_factors(SHAPES[:2], 3, "scattered", seed=2)
    Ps, Qs, actives = ([t.to(device) for t in ts] for ts in (Ps, Qs, actives))
    for qs in (Qs, [Qs[0].float(), Qs[1]]):
        torch.testing.assert_close(
            triton_backend.orth_penalty(Ps, qs, actives, 0.1), reference.orth_penalty(Ps, qs, actives, 0.1), rtol=1e-5, atol=0
        )


def test_argument_errors(device):
    Ps, Qs, actives = orth_factors(SHAPES[:2], 3, "scattered", seed=3)
    with pytest.raises(ValueError, match="orth_penalty: 2 P, 1 Q and 2 active masks"):
        triton_backend.orth_penalty(Ps, Qs[:1], actives, 0.1)
    with pytest.raises(ValueError, match="orth_penalty: no matrices"):
        triton_backend.orth_penalty([], [], [], 0.1)
