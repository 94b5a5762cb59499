"""Phases and the rank scheduler at the boundary steps (docs/ALGORITHM.md §5)."""
import pytest

from elalora import ElaLoRAConfig
from elalora.schedule import Phase, budget, is_round_step, phase

CONFIG = ElaLoRAConfig(t_init=10, t_final=20, total_steps=100, mask_interval=5, b=4)


@pytest.mark.parametrize(
    "t,expected_phase,expected_budget",
    [
        (0, Phase.WARMUP, 4),
        (10, Phase.WARMUP, 4),  # t_init: still warm-up, p = 0
        (11, Phase.DYNAMIC, 4),  # t_init + 1: p = 1/70
        (79, Phase.DYNAMIC, 0),  # T - t_final - 1: p = 69/70, 4·(1 − p³) = 0.17 -> 0
        (80, Phase.STABLE, 0),  # T - t_final: p = 1
        (99, Phase.STABLE, 0),
    ],
)
def test_boundaries(t, expected_phase, expected_budget):
    assert phase(t, CONFIG) is expected_phase
    assert budget(t, CONFIG) == expected_budget


def test_budget_rounds_half_to_even():
    config = ElaLoRAConfig(t_init=0, t_final=0, total_steps=100, b=12)
    assert budget(50, config) == 10  # 12·(1 − 0.5³) = 10.5 -> 10
    config = ElaLoRAConfig(t_init=0, t_final=0, total_steps=100, b=4)
    assert budget(50, config) == 4  # 4·(1 − 0.5³) = 3.5 -> 4


def test_scheduler_off_keeps_b0():
    config = CONFIG.replace(rank_scheduler=False)
    assert [budget(t, config) for t in (11, 50, 79)] == [4, 4, 4]


def test_round_steps():
    rounds = [t for t in range(100) if is_round_step(t, CONFIG)]
    assert rounds[0] == 15 and all((t - 10) % 5 == 0 for t in rounds)
    assert rounds[-1] == max(t for t in range(15, 80, 5) if budget(t, CONFIG) > 0)
    assert not is_round_step(10, CONFIG)  # t_init itself is warm-up
