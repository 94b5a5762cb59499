"""docs/ALGORITHM.md §2 for every adapter tensor at once, in torch ops.

The reference's elementwise float32 formula runs once over all tensors
concatenated, so it is bit-identical to
:func:`elalora_kernels.reference.score_ema_update` in a few ops, on any device.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def score_ema_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ema_ipt: Sequence[Tensor],
    ema_unc: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> int:
    """In place on the float32 EMAs; returns how many elements had a non-finite ``|w·g|``."""
    check_lengths(params, grads, ema_ipt, ema_unc)
    if not params:
        return 0
    for i, (w, g, a, u) in enumerate(zip(params, grads, ema_ipt, ema_unc)):
        n = w.numel()
        if g.numel() != n or a.numel() != n or u.numel() != n:
            raise ValueError(f"score_ema_update: tensors at index {i} differ in size")
        if w.dtype not in _SUPPORTED or g.dtype not in _SUPPORTED:
            raise TypeError(f"score_ema_update: params/grads must be float32, bfloat16 or float16 (index {i})")
        if a.dtype != torch.float32 or u.dtype != torch.float32:
            raise TypeError(f"score_ema_update: EMAs must be float32 (index {i})")
    w = torch.cat([t.reshape(-1).float() for t in params])
    g = torch.cat([t.reshape(-1).float() for t in grads])
    old_ipt = torch.cat([t.reshape(-1) for t in ema_ipt])
    old_unc = torch.cat([t.reshape(-1) for t in ema_unc])
    ipt = (w * g).abs()
    finite = torch.isfinite(ipt)
    new_ipt = beta1 * old_ipt + (1 - beta1) * ipt
    new_unc = beta2 * old_unc + (1 - beta2) * (ipt - new_ipt).abs()
    new_ipt = torch.where(finite, new_ipt, old_ipt)
    new_unc = torch.where(finite, new_unc, old_unc)
    sizes = [t.numel() for t in params]
    torch._foreach_copy_(list(ema_ipt), [s.view(t.shape) for s, t in zip(new_ipt.split(sizes), ema_ipt)])
    torch._foreach_copy_(list(ema_unc), [s.view(t.shape) for s, t in zip(new_unc.split(sizes), ema_unc)])
    return int(finite.numel() - finite.sum())


def check_lengths(params, grads, ema_ipt, ema_unc) -> None:
    if not (len(params) == len(grads) == len(ema_ipt) == len(ema_unc)):
        raise ValueError(
            "score_ema_update: params, grads, ema_ipt and ema_unc must have the same length "
            f"(got {len(params)}, {len(grads)}, {len(ema_ipt)}, {len(ema_unc)})"
        )
