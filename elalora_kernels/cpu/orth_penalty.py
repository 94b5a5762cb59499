"""docs/ALGORITHM.md §6 on CPU tensors: the penalty and its gradient from one C++ call.

The C++ op (csrc/orth_penalty.cpp) reads every P and Q in place, over the
active slots only, and writes the value and the gradient of every factor in the
same pass; backward only hands those gradients on (scaled, unless the loss's
gradient is exactly 1, as it is for ``loss + penalty``). Without the extension
(or for tensors on another device) the torch backend's batched version runs instead.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _extension, torch_ops


class OrthPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, actives, coeff, *factors):
        M = len(actives)
        value, ctx.grads = _run(factors[:M], factors[M:], actives, coeff, want_grads=True)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
            grads = torch._foreach_mul(grads, grad_output)
        return (None, None, *grads)


def orth_penalty(Ps: Sequence[Tensor], Qs: Sequence[Tensor], actives: Sequence[Tensor], coeff: float) -> Tensor:
    """``reference.orth_penalty``: float32 scalar, differentiable in every P and Q."""
    if not (len(Ps) == len(Qs) == len(actives)):
        raise ValueError(f"orth_penalty: {len(Ps)} P, {len(Qs)} Q and {len(actives)} active masks")
    if not Ps:
        raise ValueError("orth_penalty: no matrices")
    if Ps[0].device.type != "cpu" or not _extension.available():
        return torch_ops.orth_penalty(Ps, Qs, actives, coeff)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*Ps, *Qs)):
        return OrthPenaltyFunction.apply(tuple(actives), float(coeff), *Ps, *Qs)
    return _run(Ps, Qs, actives, float(coeff), want_grads=False)[0]


def _run(Ps, Qs, actives, coeff: float, want_grads: bool) -> tuple[Tensor, list[Tensor]]:
    """The value as a float32 scalar and, when wanted, the gradients of every P, then every Q."""
    M = len(Ps)
    total, grads = _extension.load().orth_penalty(list(Ps), list(Qs), list(actives), coeff / M, want_grads)
    return torch.tensor(total * (coeff / (2 * M)), dtype=torch.float32), grads
