"""Which ranks a round prunes and where it adds new ones (docs/ALGORITHM.md §4.1–4.5).

Pure Python on a table of rank scores, so every decision is testable on
hand-built numbers and identical on every process of a data-parallel job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ._checks import is_int


@dataclass
class RoundPlan:
    prune: list[tuple[int, int]] = field(default_factory=list)  # (matrix, slot) removed
    expand: list[int] = field(default_factory=list)  # one matrix index per new rank, ascending
    passed_over: list[int] = field(default_factory=list)  # full matrices skipped for expansion


def plan_round(
    scores: Sequence[Sequence[float]], ranks: Sequence[int], r_max: int, k: int, b: int
) -> RoundPlan:
    """Plan one round on ``scores[m][j]`` (slot j of matrix m; slots ``0..ranks[m]-1`` active).

    Candidates of matrix m are its ``k_m = min(k, r_m − 1)`` weakest ranks
    (``max(1, k_m)`` for expansion). Both pools are ordered strictly by
    (score, matrix, slot). The first ``b`` prune candidates are removed; the
    same number of new ranks go to the largest expansion candidates, skipping
    matrices with no free slot left after pruning.
    """
    _check_plan_inputs(scores, ranks, r_max, k, b)
    prune_pool, expand_pool = [], []
    for m, r in enumerate(ranks):
        weakest = sorted((scores[m][j], m, j) for j in range(r))
        k_m = min(k, r - 1)
        prune_pool += weakest[:k_m]
        expand_pool += weakest[: max(1, k_m)]
    prune_pool.sort()
    expand_pool.sort(reverse=True)

    plan = RoundPlan(prune=[(m, j) for _, m, j in prune_pool[:b]])
    free = [r_max - r for r in ranks]
    for m, _ in plan.prune:
        free[m] += 1
    for _, m, _ in expand_pool:
        if len(plan.expand) == len(plan.prune):
            break
        if free[m] == 0:
            plan.passed_over.append(m)
            continue
        free[m] -= 1
        plan.expand.append(m)
    # Each pruned matrix offers at least as many expansion candidates as it
    # lost and has that many free slots, so the budget is always placed.
    assert len(plan.expand) == len(plan.prune), "internal error: total rank not conserved"
    plan.expand.sort()
    return plan


def _check_plan_inputs(scores, ranks, r_max, k, b) -> None:
    """Reject inputs that would give a wrong plan or an obscure error (once per round: cheap)."""
    if not (is_int(r_max) and r_max >= 1):
        raise ValueError(f"plan_round: r_max must be an int >= 1 (got {r_max!r})")
    if not (is_int(k) and k >= 1):
        raise ValueError(f"plan_round: k must be an int >= 1 (got {k!r})")
    if not (is_int(b) and b >= 0):
        raise ValueError(f"plan_round: b must be an int >= 0 (got {b!r})")
    if len(scores) != len(ranks):
        raise ValueError(f"plan_round: scores has {len(scores)} rows but ranks has {len(ranks)} entries")
    for m, (row, r) in enumerate(zip(scores, ranks)):
        if not (is_int(r) and 1 <= r <= r_max):
            raise ValueError(f"plan_round: ranks[{m}] must be an int in [1, r_max = {r_max}] (got {r!r})")
        if len(row) < r:
            raise ValueError(f"plan_round: scores[{m}] has {len(row)} entries, fewer than its rank {r}")
        for j in range(r):
            if row[j] != row[j]:  # NaN breaks the strict order every process must agree on
                raise ValueError(f"plan_round: scores[{m}][{j}] is nan; scores must not be NaN")
