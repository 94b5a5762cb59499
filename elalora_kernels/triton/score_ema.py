"""docs/ALGORITHM.md §2 for a list of tensors, one launch per (w, g) dtype pair, per call.

Tensors the kernel does not take (odd layouts, other dtypes) are updated with
the reference's torch ops. The allocator's per-step update goes through
:mod:`.resident_score_ema` instead, whose tables stay on the device.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from elalora_kernels import reference
from elalora_kernels.torch_ops.score_ema import check_lengths

from . import _common, score_ema_kernel
from .score_ema_tables import tables_for


def score_ema_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ema_ipt: Sequence[Tensor],
    ema_unc: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> int:
    """``reference.score_ema_update`` in one launch; returns the number of non-finite elements."""
    if len(params) == 0:
        return 0
    return int(score_ema_update_async(params, grads, ema_ipt, ema_unc, beta1, beta2).item())


def score_ema_update_async(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ema_ipt: Sequence[Tensor],
    ema_unc: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> Tensor:
    """The update without a host sync: returns the non-finite count as an int32 device tensor."""
    check_lengths(params, grads, ema_ipt, ema_unc)
    device = params[0].device if len(params) else torch.device("cpu")
    count = torch.zeros(1, dtype=torch.int32, device=device)
    groups: dict[tuple, list] = {}
    for quad in zip(params, grads, ema_ipt, ema_unc):
        w, g, i, u = (t.detach() for t in quad)
        if w.numel() == 0:
            continue
        if not score_ema_kernel.takes(w, g, i, u):  # odd layouts: correct, not fast
            count += reference.score_ema_update([w], [g], [i], [u], beta1, beta2)
            continue
        groups.setdefault((w.dtype, g.dtype, w.device), []).append((w, g, i, u))
    for (dtype, _, _), group in groups.items():
        _common.run_or_fall_back(("score_ema", dtype), lambda: score_ema_kernel.launch(tables_for(group), count, beta1, beta2),
                                 lambda: update_with_torch(group, count, beta1, beta2))
    return count


def update_with_torch(quads, count: Tensor, beta1: float, beta2: float) -> None:
    """The fallback: ``reference.score_ema_update_one`` per (w, g, Ī, Ū), the count kept on the device."""
    for w, g, i, u in quads:
        count += reference.score_ema_update_one(w, g, i, u, beta1, beta2)
