"""The rule every fast op is held to, on every backend: the float64 oracle.

The exact answer is the reference (``elalora_kernels.reference``) evaluated in
float64 on the op's inputs rounded to the test's precision, so the rounding of
the inputs is no one's error. A fast op's error against it must be at most
twice the error of the reference itself run in that precision (eager PyTorch,
as shipped), plus a floor of ``FLOOR_EPS`` units of the precision's epsilon
relative to the result's largest value. The floor matters only where eager
happens to be exact or nearly so. One rule for every backend and dtype: over
the ~1,400 comparisons of the CPU (tests/kernels/) and Triton (tests/triton/)
tests, the largest floor needed is 2.2 eps (CPU float16 dλ, where eager is 9x
more accurate than usual), Triton's is 2.0 eps (float32 dP of a one-row input),
and no bfloat16 result of either backend needs more than 0.5 eps; 4 eps keeps
twice that margin.
"""
from __future__ import annotations

from typing import Sequence

import torch

FACTOR = 2.0  # of eager's own error
FLOOR_EPS = 4.0  # units of eps · max |exact|


def rounded(t, dtype: torch.dtype):
    """``t`` rounded to ``dtype``, then held in float64: an exact op's input (non-tensors pass through)."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().to(dtype).double()
    return t


def bound(eager_error: float, exact: torch.Tensor, dtype: torch.dtype) -> float:
    size = exact.abs().max().item() if exact.numel() else 0.0
    return FACTOR * eager_error + FLOOR_EPS * torch.finfo(dtype).eps * size


def _error(t: torch.Tensor, exact: torch.Tensor) -> float:
    return (t.detach().double().cpu() - exact.detach().double().cpu()).abs().max().item() if exact.numel() else 0.0


def assert_within_eager_error(
    ours: Sequence[torch.Tensor], eager: Sequence[torch.Tensor], exact: Sequence[torch.Tensor],
    dtype: torch.dtype, names: Sequence[str],
) -> None:
    """Every result of ``ours`` within the rule; ``dtype`` is the precision both ran in (the autocast one)."""
    assert len(ours) == len(eager) == len(exact) == len(names)
    for name, o, e, x in zip(names, ours, eager, exact):
        assert o.shape == x.shape, f"{name}: shape {tuple(o.shape)}, expected {tuple(x.shape)}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values (an unwritten output?)"
        err, err_eager = _error(o, x), _error(e, x)
        limit = bound(err_eager, x, dtype)
        assert err <= limit, f"{name} {dtype}: error {err:.3g} > {limit:.3g} (eager {err_eager:.3g})"
