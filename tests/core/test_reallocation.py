"""plan_round on hand-built score tables (docs/ALGORITHM.md §4) and its invariants on random ones."""
import random

import pytest

from elalora.reallocation import plan_round


def test_pool_takes_k_weakest_per_matrix_and_prunes_b_smallest():
    scores = [[5.0, 1.0, 3.0, 2.0], [0.5, 9.0, 9.0]]
    plan = plan_round(scores, ranks=[4, 3], r_max=6, k=2, b=2)
    # pools: m0 -> slots 1 (1.0), 3 (2.0); m1 -> slot 0 (0.5), slot 1 (9.0; tie with 2, lower slot first)
    assert plan.prune == [(1, 0), (0, 1)]
    # expansion: largest entries are m1's 9.0 then m0's 2.0
    assert plan.expand == [0, 1]


def test_k_limits_what_one_matrix_can_lose():
    scores = [[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]]
    plan = plan_round(scores, ranks=[4, 4], r_max=4, k=1, b=2)
    assert plan.prune == [(0, 0), (1, 0)]  # m0 may lose only one although all its ranks are weakest


def test_ties_break_by_matrix_then_slot():
    scores = [[3.0, 1.0, 1.0], [1.0, 1.0, 3.0]]
    plan = plan_round(scores, ranks=[3, 3], r_max=4, k=2, b=3)
    assert plan.prune == [(0, 1), (0, 2), (1, 0)]
    # expansion pool (largest first): m1 slot1 (1.0), m1 slot0, m0 slot2, m0 slot1 -> three taken
    assert plan.expand == [0, 1, 1]


def test_expansion_multiplicity_up_to_k():
    scores = [[0.1, 0.2, 0.3], [8.0, 9.0, 10.0], [1.0, 1.5, 2.0]]
    plan = plan_round(scores, ranks=[3, 3, 3], r_max=6, k=2, b=2)
    assert plan.prune == [(0, 0), (0, 1)]
    assert plan.expand == [1, 1]  # m1's two weakest are still the strongest candidates


def test_matrix_at_rank_one_never_pruned_but_can_grow():
    scores = [[100.0, 0, 0], [0.2, 0.3, 0.4], [1.0, 2.0, 3.0]]
    plan = plan_round(scores, ranks=[1, 3, 3], r_max=3, k=2, b=1)
    assert plan.prune == [(1, 0)]
    assert plan.expand == [0]  # its one rank is offered for expansion (deviation from the authors)


def test_full_matrix_is_passed_over_for_next_largest():
    scores = [[50.0, 60.0], [0.1, 0.2, 0.3], [5.0, 6.0]]
    plan = plan_round(scores, ranks=[2, 3, 2], r_max=3, k=1, b=1)
    # m0's candidate (50) is the largest and m0 has a free slot: it grows
    assert plan.prune == [(1, 0)] and plan.expand == [0]
    plan = plan_round([[50.0, 60.0, 70.0], [0.1, 0.2, 0.3], [5.0, 6.0]], ranks=[3, 3, 2], r_max=3, k=1, b=1)
    assert plan.prune == [(1, 0)]
    assert plan.passed_over == [0]  # full: skipped, next-largest (m2's 5.0) taken
    assert plan.expand == [2]


def test_prune_and_expand_the_same_matrix():
    scores = [[0.1, 20.0, 30.0], [5.0, 6.0, 7.0]]
    plan = plan_round(scores, ranks=[3, 3], r_max=3, k=1, b=1)
    assert plan.prune == [(0, 0)]
    # both at r_max before the round; m0 freed a slot and its weakest candidate (0.1) is smaller
    # than m1's (5.0), but m1 is full -> passed over, m0 takes its own rank back
    assert plan.passed_over == [1] and plan.expand == [0]


def test_pool_smaller_than_budget_moves_what_it_holds():
    plan = plan_round([[1.0], [2.0, 3.0], [4.0]], ranks=[1, 2, 1], r_max=4, k=2, b=4)
    assert plan.prune == [(1, 0)] and len(plan.expand) == 1


def test_zero_budget_moves_nothing():
    plan = plan_round([[1.0, 2.0], [3.0, 4.0]], ranks=[2, 2], r_max=4, k=2, b=0)
    assert plan.prune == [] and plan.expand == []


@pytest.mark.parametrize("seed", range(400))
def test_random_rounds_keep_invariants(seed):
    rng = random.Random(seed)
    r_max = rng.randint(1, 8)
    m_count = rng.randint(1, 12)
    k, b = rng.randint(1, 4), rng.randint(0, 10)
    ranks = [rng.randint(1, r_max) for _ in range(m_count)]
    # few distinct values so that ties are common
    scores = [[float(rng.randint(0, 5)) for _ in range(r_max)] for _ in range(m_count)]
    plan = plan_round(scores, ranks, r_max, k, b)

    pool = sorted((scores[m][j], m, j) for m, r in enumerate(ranks) for j in sorted(range(r), key=lambda j: (scores[m][j], j))[: min(k, r - 1)])
    assert len(plan.prune) == min(b, len(pool)) == len(plan.expand)
    assert len(set(plan.prune)) == len(plan.prune)
    assert all(j < ranks[m] for m, j in plan.prune)
    pruned = set(plan.prune)
    kept = [(s, m, j) for s, m, j in pool if (m, j) not in pruned]
    if kept and pruned:  # the pruned are exactly the smallest of the pool in (score, matrix, slot) order
        assert max((scores[m][j], m, j) for m, j in pruned) < min(kept)
    new_ranks = list(ranks)
    for m, _ in plan.prune:
        new_ranks[m] -= 1
    for m in plan.expand:
        new_ranks[m] += 1
    assert sum(new_ranks) == sum(ranks)
    assert all(1 <= r <= r_max for r in new_ranks)
    for m in range(m_count):
        assert sum(1 for mm, _ in plan.prune if mm == m) <= min(k, ranks[m] - 1)
        assert plan.expand.count(m) <= max(1, min(k, ranks[m] - 1))
