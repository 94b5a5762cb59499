"""docs/ALGORITHM.md §2 for every adapter tensor at once, on CPU tensors, in C++.

The extension (csrc/score_ema.cpp) makes one OpenMP pass over all tensors that
reads (w, g, Ī, Ū) once and writes (Ī, Ū) once, bit-identical to
:func:`elalora_kernels.reference.score_ema_update`. Without the extension (or
for tensors on another device) the torch backend's version runs: bit-identical too.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .. import _extension, torch_ops
from ..torch_ops.score_ema import check_lengths


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
    if params[0].device.type == "cpu":
        ext = _extension.load()
        if ext is not None:
            return ext.score_ema_update(list(params), list(grads), list(ema_ipt), list(ema_unc), float(beta1), float(beta2))
    return torch_ops.score_ema_update(params, grads, ema_ipt, ema_unc, beta1, beta2)
