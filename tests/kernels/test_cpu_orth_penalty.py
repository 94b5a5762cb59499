"""The fused orthogonality penalty (elalora_kernels.cpu.orth_penalty, csrc/orth_penalty.cpp) against the reference.

Value and gradients follow the float64-oracle rule of tests/_kernel_oracle.py.
"""
from __future__ import annotations

import pytest
import torch

import elalora_kernels
from elalora_kernels import _extension, cpu, reference, torch_ops
from elalora_kernels.cpu import orth_penalty
from _kernel_cases import PATTERNS, orth_factors, penalty_and_grads, penalty_names
from _kernel_oracle import assert_within_eager_error, rounded

pytestmark = pytest.mark.skipif(not _extension.available(), reason="the C++ extension is not built")

# (out, in) of every matrix: odd sizes, 1×1, repeated shapes that share a group, P and Q of unequal length.
SHAPE_SETS = {
    "one 1x1": [(1, 1)],
    "odd": [(7, 123), (123, 7), (7, 123)],
    "mixed": [(17, 5), (300, 123), (17, 5), (5, 300), (64, 33)],
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("r", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=str)
def test_value_and_gradients_within_eager_error_of_float64(shapes, dtype, r, pattern):
    Ps, Qs, actives = orth_factors(SHAPE_SETS[shapes], r, pattern)
    exact_Ps, exact_Qs = ([rounded(t, dtype) for t in ts] for ts in (Ps, Qs))
    exact = penalty_and_grads(reference.orth_penalty, exact_Ps, exact_Qs, actives, torch.float64, compute_dtype=torch.float64)
    eager = penalty_and_grads(reference.orth_penalty, Ps, Qs, actives, dtype)
    ours = penalty_and_grads(orth_penalty, Ps, Qs, actives, dtype)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    assert all(g.dtype == dtype for g in ours[1:])
    assert_within_eager_error(ours, eager, exact, dtype, penalty_names(len(Ps)))


def test_float64_inputs_match_the_reference():
    """float64 factors are computed in float32, as the reference does, and get float64 gradients."""
    Ps, Qs, actives = orth_factors(SHAPE_SETS["mixed"], 6, "scattered", seed=1)
    ours = penalty_and_grads(orth_penalty, Ps, Qs, actives, torch.float64)
    ref = penalty_and_grads(reference.orth_penalty, Ps, Qs, actives, torch.float64)
    assert all(g.dtype == torch.float64 for g in ours[1:])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_inactive_slots_add_nothing_and_get_exact_zero_gradient():
    shapes, r = SHAPE_SETS["mixed"], 5
    Ps, Qs, actives = orth_factors(shapes, r, "scattered", seed=2)
    base = penalty_and_grads(orth_penalty, Ps, Qs, actives, torch.float32)
    for P, Q, a in zip(Ps, Qs, actives):
        P[:, ~a] = 1e3
        Q[~a] = float("nan")
    again = penalty_and_grads(orth_penalty, Ps, Qs, actives, torch.float32)
    assert torch.equal(again[0], base[0])
    M = len(shapes)
    for m, a in enumerate(actives):
        assert (again[1 + m][:, ~a] == 0).all() and (again[1 + M + m][~a] == 0).all()
        assert torch.equal(again[1 + m][:, a], base[1 + m][:, a])


def test_same_bits_at_any_thread_count_and_with_or_without_gradients():
    Ps, Qs, actives = orth_factors(SHAPE_SETS["mixed"] * 3, 8, "packed half", seed=3)
    torch.set_num_threads(1)
    one = penalty_and_grads(orth_penalty, Ps, Qs, actives, torch.float32)
    torch.set_num_threads(2)
    two = penalty_and_grads(orth_penalty, Ps, Qs, actives, torch.float32)
    with torch.no_grad():
        value_only = orth_penalty([p.float() for p in Ps], [q.float() for q in Qs], actives, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert torch.equal(value_only, one[0])


def test_gradient_is_scaled_by_the_incoming_gradient():
    Ps, Qs, actives = orth_factors(SHAPE_SETS["odd"], 4, "r_active=r_max", seed=4)
    Ps = [p.float().requires_grad_(True) for p in Ps]
    Qs = [q.float().requires_grad_(True) for q in Qs]
    plain = torch.autograd.grad(orth_penalty(Ps, Qs, actives, 0.1), Ps + Qs)
    tripled = torch.autograd.grad(orth_penalty(Ps, Qs, actives, 0.1) * -3.0, Ps + Qs)
    for a, b in zip(plain, tripled):
        torch.testing.assert_close(b, -3.0 * a, rtol=1e-6, atol=0)


def test_non_contiguous_factors():
    """Views with strides (a column-major P, every other column of Q) are read in place."""
    Ps, Qs, actives = orth_factors([(9, 30), (20, 11)], 6, "scattered", seed=5)
    Ps, Qs = [p.float() for p in Ps], [q.float() for q in Qs]
    Ps_view = [p.t().contiguous().t().requires_grad_(True) for p in Ps]
    Qs_view = [torch.stack([q, q], dim=2).flatten(1)[:, ::2].requires_grad_(True) for q in Qs]
    assert not any(t.is_contiguous() for t in Ps_view + Qs_view)
    value = orth_penalty(Ps_view, Qs_view, actives, 0.1)
    ours = [value.detach(), *torch.autograd.grad(value, Ps_view + Qs_view)]
    ref = penalty_and_grads(reference.orth_penalty, Ps, Qs, actives, torch.float32)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ("drop a Q", r"orth_penalty: 2 P, 1 Q and 2 active masks"),
        ("Q of another rank", r"orth_penalty: matrix 1 needs CPU P \[out, r_max\] and Q \[r_max, in\]"),
        ("mask too short", r"orth_penalty: active mask 0 must be a CPU bool tensor of shape \[4\]"),
        ("integer factors", r"orth_penalty: unsupported dtype Long"),
    ],
)
def test_bad_arguments_raise_a_clear_error(change, message):
    Ps, Qs, actives = orth_factors([(5, 6), (7, 8)], 4, "scattered", seed=6)
    Ps, Qs = [p.float() for p in Ps], [q.float() for q in Qs]
    if change == "drop a Q":
        Qs = Qs[:1]
    elif change == "Q of another rank":
        Qs[1] = Qs[1][:3]
    elif change == "mask too short":
        actives[0] = actives[0][:3]
    else:
        Ps, Qs = [p.long() for p in Ps], [q.long() for q in Qs]
    with pytest.raises(ValueError, match=message):
        orth_penalty(Ps, Qs, actives, 0.1)


@elalora_kernels.use_backend("cpu")
def test_dispatch_runs_the_fused_op_on_cpu_and_batched_ops_without_the_extension(monkeypatch):
    assert cpu.orth_penalty is orth_penalty
    Ps, Qs, actives = orth_factors(SHAPE_SETS["mixed"], 4, "packed half", seed=7)
    Ps, Qs = [p.float() for p in Ps], [q.float() for q in Qs]
    fused = elalora_kernels.orth_penalty(Ps, Qs, actives, 0.1)
    calls = []
    monkeypatch.setattr(_extension, "available", lambda: False)
    monkeypatch.setattr(torch_ops, "orth_penalty", lambda *args: calls.append(args) or reference.orth_penalty(*args))
    fallback = elalora_kernels.orth_penalty(Ps, Qs, actives, 0.1)
    assert len(calls) == 1
    torch.testing.assert_close(fused, fallback, rtol=1e-6, atol=0)
