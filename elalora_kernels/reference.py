"""Eager PyTorch version of every op: readable, slow, and the oracle every
fast backend is tested against. Formulas follow docs/ALGORITHM.md section by section.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def adapter_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    active: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    rank: int | None = None,
) -> Tensor:
    """docs/ALGORITHM.md §1: ``x W0ᵀ + bias + s·((dropout(x) Qᵀ) ⊙ (λ·active)) Pᵀ``.

    ``active`` is a boolean mask over the rank slots; an inactive slot adds
    nothing and receives zero gradient. ``rank`` (all slots if None) uses slots
    [0, rank) only: the others get zero gradient too. Dropout is ``F.dropout(x, p)``
    drawn before anything else, so every backend sees the same mask for one seed.
    """
    if rank is not None:
        P, lam, Q, active = P[:, :rank], lam[:rank], Q[:rank], active[:rank]
    x_adapter = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    base = F.linear(x, weight, bias)
    lam_eff = lam * active.to(lam.dtype)
    return base + scale * ((x_adapter @ Q.t()) * lam_eff) @ P.t()


def adapter_add(
    y0: Tensor, x: Tensor, P: Tensor, lam: Tensor, Q: Tensor, active: Tensor, scale: float, dropout_p: float = 0.0
) -> Tensor:
    """The adapter half of :func:`adapter_linear` added to a base output ``y0`` computed elsewhere.

    ``adapter_linear(x, W0, b, ...) == adapter_add(F.linear(x, W0, b), x, ...)``: the entry point for
    a base that runs as its own module (a quantized one, docs/ALGORITHM.md §1).
    """
    x_adapter = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    lam_eff = lam * active.to(lam.dtype)
    return y0 + scale * ((x_adapter @ Q.t()) * lam_eff) @ P.t()


def score_ema_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ema_ipt: Sequence[Tensor],
    ema_unc: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> int:
    """docs/ALGORITHM.md §2, in place on the float32 EMAs of every tensor.

    Elements whose ``|w·g|`` is not finite keep their EMAs; returns how many.
    """
    return sum(
        int(score_ema_update_one(w, g, i, u, beta1, beta2))
        for w, g, i, u in zip(params, grads, ema_ipt, ema_unc, strict=True)
    )


def score_ema_update_one(w: Tensor, g: Tensor, ipt_ema: Tensor, unc_ema: Tensor, beta1: float, beta2: float) -> Tensor:
    """docs/ALGORITHM.md §2 for one tensor, in place; returns the non-finite count as a tensor (no host sync)."""
    ipt = (w.float() * g.float()).abs()
    finite = torch.isfinite(ipt)
    new_ipt = beta1 * ipt_ema + (1 - beta1) * ipt
    new_unc = beta2 * unc_ema + (1 - beta2) * (ipt - new_ipt).abs()
    unc_ema.copy_(torch.where(finite, new_unc, unc_ema))
    ipt_ema.copy_(torch.where(finite, new_ipt, ipt_ema))
    return (~finite).sum()


def rank_scores(
    ipt: Sequence[tuple[Tensor, Tensor, Tensor]],
    unc: Sequence[tuple[Tensor, Tensor, Tensor]],
) -> Tensor:
    """docs/ALGORITHM.md §3 for M matrices sharing ``r_max``: returns float32 [M, r_max].

    ``ipt[m]`` and ``unc[m]`` are the (P, λ, Q) EMAs of matrix m, shapes
    [out, r_max], [r_max], [r_max, in]. The two means are added first.
    """
    rows = []
    for (ip, il, iq), (up, ul, uq) in zip(ipt, unc, strict=True):
        rows.append(il * ul + ((iq * uq).mean(dim=1) + (ip * up).mean(dim=0)))
    return torch.stack(rows)


def orth_penalty(
    Ps: Sequence[Tensor],
    Qs: Sequence[Tensor],
    actives: Sequence[Tensor],
    coeff: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """docs/ALGORITHM.md §6: ``c/(2M) Σ_m ‖Q_m Q_mᵀ − I‖_F + ‖P_mᵀ P_m − I‖_F`` over active ranks.

    Computed and returned in float32 as every backend does; tests evaluate it in
    ``compute_dtype=torch.float64`` as the exact answer on the same inputs.
    """
    total = Ps[0].new_zeros((), dtype=compute_dtype)
    for P, Q, active in zip(Ps, Qs, actives, strict=True):
        q = Q[active].to(compute_dtype)
        p = P[:, active].to(compute_dtype)
        eye = torch.eye(q.shape[0], device=q.device, dtype=compute_dtype)
        total = total + torch.linalg.matrix_norm(q @ q.t() - eye) + torch.linalg.matrix_norm(p.t() @ p - eye)
    return coeff / (2 * len(Ps)) * total
