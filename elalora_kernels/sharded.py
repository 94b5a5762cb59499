"""Rank scores (docs/ALGORITHM.md §3) and the orthogonality penalty (§6) on adapters split over processes.

FSDP2 splits every adapter tensor on dim 0 with ``torch.chunk`` semantics: P
``[out, r_max]`` by rows, λ ``[r_max]`` and Q ``[r_max, in]`` by slot. Each op
is a local part, computed by every process on its own shards, and a combination
of every process's parts; ``elalora/fsdp.py`` moves the parts between processes
(an all-reduce that sums them, an all-gather that stacks them). Both halves are
plain tensor math, so the tests run them on one process against
:mod:`elalora_kernels.reference` by simulating the shards.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The dim-0 rows ``[start, stop)`` of an n-row tensor that process ``rank`` of ``world`` holds (torch.chunk)."""
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def rank_score_parts(
    ipt: Sequence[tuple[Tensor, Tensor, Tensor]], unc: Sequence[tuple[Tensor, Tensor, Tensor]], world: int, rank: int
) -> Tensor:
    """This process's float64 [3, M, r_max] part of the score table; the parts of all processes are summed.

    Row 0: the column sums of P's Ī·Ū over this process's rows of P. Rows 1 and 2,
    for the slots this process holds: the λ term and the Q row mean, computed in
    float32 as a single process computes them (every other process adds exact zeros).
    """
    r_max = ipt[0][0].shape[1]
    parts = torch.zeros(3, len(ipt), r_max, dtype=torch.float64, device=ipt[0][1].device)
    start, stop = shard_rows(r_max, world, rank)
    for m, ((ip, il, iq), (up, ul, uq)) in enumerate(zip(ipt, unc, strict=True)):
        parts[0, m] = (ip * up).sum(dim=0, dtype=torch.float64)
        parts[1, m, start:stop] = il * ul
        parts[2, m, start:stop] = (iq * uq).mean(dim=1)
    return parts


def rank_scores_from_parts(summed: Tensor, out_features: Sequence[int]) -> Tensor:
    """The float32 [M, r_max] scores from the sum of every process's :func:`rank_score_parts`.

    Only P's column mean is rounded differently from a single process: its float64
    sum is divided and rounded to float32 once.
    """
    out = torch.tensor(out_features, dtype=torch.float64, device=summed.device)[:, None]
    p_mean = (summed[0] / out).float()
    return summed[1].float() + (summed[2].float() + p_mean)


def orth_penalty_piece(Ps: Sequence[Tensor], Qs: Sequence[Tensor], ranks: Sequence[int], world: int) -> Tensor:
    """This process's flat float32 piece of the penalty; the pieces of all processes are stacked.

    ``‖PᵀP − I‖`` needs only the sum over processes of ``P_rowsᵀ P_rows`` over the
    active slots (``ranks``: the active slots are the first ones), and ``‖QQᵀ − I‖``
    needs Q's active rows, wherever they are: every layer's r×r partial Gram
    matrix, then every layer's Q shard padded to the largest shard (pieces of one
    size on every process).
    """
    grams = []
    for P, r in zip(Ps, ranks, strict=True):
        p = P[:, :r].float()
        grams.append((p.t() @ p).reshape(-1))
    shards = []
    for P, Q in zip(Ps, Qs, strict=True):
        chunk = -(-P.shape[1] // world)  # P holds every slot of its rows: r_max
        shards.append(F.pad(Q.float(), (0, 0, 0, chunk - Q.shape[0])).reshape(-1))
    return torch.cat(grams + shards)


def orth_penalty_from_pieces(
    pieces: Tensor, ranks: Sequence[int], r_maxes: Sequence[int], in_features: Sequence[int], coeff: float
) -> Tensor:
    """``reference.orth_penalty`` as a float32 scalar from the [world, n] stack of every process's
    :func:`orth_penalty_piece` (layers of active rank ``ranks``, Q of shape ``[r_max, in]``)."""
    world = pieces.shape[0]
    start = 0
    grams_p = []
    for r in ranks:
        grams_p.append(pieces[:, start : start + r * r].sum(dim=0).view(r, r))
        start += r * r
    total = pieces.new_zeros(())
    for r, gram_p, r_max, d_in in zip(ranks, grams_p, r_maxes, in_features, strict=True):
        rows = []
        for k in range(world):
            lo, hi = shard_rows(r_max, world, k)
            rows.append(pieces[k, start : start + (hi - lo) * d_in].view(hi - lo, d_in))
        start += -(-r_max // world) * d_in
        q = torch.cat(rows)[:r]
        eye = torch.eye(r, device=pieces.device)
        total = total + torch.linalg.matrix_norm(q @ q.t() - eye) + torch.linalg.matrix_norm(gram_p - eye)
    return coeff / (2 * len(ranks)) * total
