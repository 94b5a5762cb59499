"""Rank scores (docs/ALGORITHM.md §3) and the orthogonality penalty (§6) for all
matrices at once, on any device.

Matrices are grouped by shape and each group is computed with batched tensor
ops, so the work is a handful of ops per distinct shape (not per matrix) and
nothing waits on the device: no boolean indexing, no ``.item()``. The Triton
backend falls back on these. (The CPU backend scores per matrix instead: there
the batched form only adds copies; see ``elalora_kernels/cpu/__init__.py``.)
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor


def _groups(keys) -> list[list[int]]:
    """Indices grouped by key, groups in order of first appearance."""
    groups: dict = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return list(groups.values())


def _index(idx: list[int], device: torch.device) -> Tensor:
    return torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True)


def rank_scores(
    ipt: Sequence[tuple[Tensor, Tensor, Tensor]],
    unc: Sequence[tuple[Tensor, Tensor, Tensor]],
) -> Tensor:
    """docs/ALGORITHM.md §3: float32 [M, r_max], bit-identical to the reference.

    ``S_j = Ī(λ_j)Ū(λ_j) + (mean_i Ī(Q_ji)Ū(Q_ji) + mean_o Ī(P_oj)Ū(P_oj))`` with
    the two means added first; each group's means reduce the same rows in the
    same order as the per-matrix reference does.
    """
    if len(ipt) != len(unc):
        raise ValueError(f"rank_scores: {len(ipt)} ipt triples but {len(unc)} unc triples")
    if not ipt:
        raise ValueError("rank_scores: no matrices")
    r = ipt[0][1].shape[0]
    out = torch.empty(len(ipt), r, dtype=torch.float32, device=ipt[0][1].device)
    return _rank_scores_into(out, ipt, unc)


def _rank_scores_into(out: Tensor, ipt, unc) -> Tensor:
    groups = _groups((tuple(p.shape), tuple(q.shape)) for p, _, q in ipt)
    for idx in groups:
        ip = torch.stack([ipt[m][0] for m in idx])
        il = torch.stack([ipt[m][1] for m in idx])
        iq = torch.stack([ipt[m][2] for m in idx])
        up = torch.stack([unc[m][0] for m in idx])
        ul = torch.stack([unc[m][1] for m in idx])
        uq = torch.stack([unc[m][2] for m in idx])
        rows = il * ul + ((iq * uq).mean(dim=2) + (ip * up).mean(dim=1))
        if len(groups) == 1:
            out.copy_(rows)
        else:
            out.index_copy_(0, _index(idx, out.device), rows)
    return out


def orth_penalty(
    Ps: Sequence[Tensor],
    Qs: Sequence[Tensor],
    actives: Sequence[Tensor],
    coeff: float,
) -> Tensor:
    """docs/ALGORITHM.md §6: ``c/(2M) Σ_m ‖Q_m Q_mᵀ − I‖_F + ‖P_mᵀ P_m − I‖_F`` over active ranks, float32.

    Every Q [r, in] and every Pᵀ [r, out] is a set of r row vectors whose Gram
    matrix is compared with the identity; rows of inactive slots are zeroed,
    and so is their diagonal of I, so they add exactly nothing, as if they
    had been cut out. Tensors of equal row length go into one batched matmul.
    """
    if not (len(Ps) == len(Qs) == len(actives)):
        raise ValueError(f"orth_penalty: {len(Ps)} P, {len(Qs)} Q and {len(actives)} active masks")
    if not Ps:
        raise ValueError("orth_penalty: no matrices")
    # (rows [r, d], mask [r]) for every Q and every Pᵀ.
    rows = [(Q, a) for Q, a in zip(Qs, actives)] + [(P.t(), a) for P, a in zip(Ps, actives)]
    total = None
    for idx in _groups((tuple(t.shape), t.dtype) for t, _ in rows):
        mask = torch.stack([rows[i][1] for i in idx]).to(torch.float32)  # [G, r]
        R = torch.stack([rows[i][0] for i in idx]).to(torch.float32) * mask.unsqueeze(2)  # [G, r, d]
        gram = torch.bmm(R, R.transpose(1, 2)) - torch.diag_embed(mask)
        part = torch.linalg.matrix_norm(gram).sum()
        total = part if total is None else total + part
    return total * (coeff / (2 * len(Ps)))
