"""The three-phase schedule and the rank scheduler (docs/ALGORITHM.md §5)."""
from __future__ import annotations

from enum import IntEnum

from .config import ElaLoRAConfig


class Phase(IntEnum):
    """Where step t is in training; an int (1, 2, 3) in logs and run records."""

    WARMUP = 1  # t ≤ t_init: scores accumulate, ranks stay
    DYNAMIC = 2  # t_init < t < T − t_final: a round every mask_interval steps
    STABLE = 3  # t ≥ T − t_final: ranks frozen, scores no longer updated


def phase(t: int, config: ElaLoRAConfig) -> Phase:
    """The phase of optimizer step ``t``, counted from 0 (docs/ALGORITHM.md §5)."""
    if t <= config.t_init:
        return Phase.WARMUP
    if t < config.total_steps - config.t_final:
        return Phase.DYNAMIC
    return Phase.STABLE


def budget(t: int, config: ElaLoRAConfig) -> int:
    """``b_t``: ranks moved by a round at step t; ``round(b0·(1 − p³))`` with the scheduler on."""
    if not config.rank_scheduler:
        return config.b
    span = config.total_steps - config.t_final - config.t_init
    p = min(max((t - config.t_init) / span, 0.0), 1.0)
    return round(config.b * (1 - p**3))


def is_round_step(t: int, config: ElaLoRAConfig) -> bool:
    """A round runs in phase 2 every ``mask_interval`` steps after t_init, if ``b_t > 0``."""
    return (
        phase(t, config) == Phase.DYNAMIC
        and (t - config.t_init) % config.mask_interval == 0
        and budget(t, config) > 0
    )
