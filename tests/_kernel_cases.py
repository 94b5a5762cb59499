"""Inputs shared by the kernel tests of every backend (tests/kernels/, tests/triton/)."""
from __future__ import annotations

import torch

# Active-slot patterns of the orthogonality penalty's cases.
PATTERNS = ["r_active=1", "r_active=r_max", "none", "scattered", "packed half"]


def pattern(name: str, r: int) -> list[bool]:
    return {
        "r_active=1": [j == 0 for j in range(r)],
        "r_active=r_max": [True] * r,
        "none": [False] * r,
        "scattered": [j % 3 != 1 for j in range(r)],
        "packed half": [j < (r + 1) // 2 for j in range(r)],
    }[name]


def orth_factors(shapes, r, pattern_name, seed=0):
    """float64 P [out, r], Q [r, in] of every (out, in) in ``shapes``, and their active masks."""
    gen = torch.Generator().manual_seed(seed)
    Ps = [torch.randn(o, r, generator=gen, dtype=torch.float64) * 0.3 for o, _ in shapes]
    Qs = [torch.randn(r, i, generator=gen, dtype=torch.float64) * 0.3 for _, i in shapes]
    actives = [torch.tensor(pattern(pattern_name, r)) for _ in shapes]
    return Ps, Qs, actives


def penalty_and_grads(fn, Ps, Qs, actives, dtype, **kw):
    """``[value, ∂/∂P for every P, ∂/∂Q for every Q]`` of ``fn(Ps, Qs, actives, 0.1)`` on the factors in ``dtype``."""
    Ps = [p.to(dtype).requires_grad_(True) for p in Ps]
    Qs = [q.to(dtype).requires_grad_(True) for q in Qs]
    value = fn(Ps, Qs, actives, 0.1, **kw)
    return [value.detach(), *torch.autograd.grad(value, Ps + Qs)]


def penalty_names(M: int) -> list[str]:
    return ["value"] + [f"P{m}" for m in range(M)] + [f"Q{m}" for m in range(M)]
