"""The three-phase schedule and the rank scheduler (ALGORITHM §5)."""
from __future__ import annotations

from .config import ElaLoRAConfig

WARMUP, DYNAMIC, STABLE = 1, 2, 3


def phase(t: int, config: ElaLoRAConfig) -> int:
    """1 warm-up (t ≤ t_init), 2 dynamic (t_init < t < T − t_final), 3 stabilisation."""
    if t <= config.t_init:
        return WARMUP
    if t < config.total_steps - config.t_final:
        return DYNAMIC
    return STABLE


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
        phase(t, config) == DYNAMIC
        and (t - config.t_init) % config.mask_interval == 0
        and budget(t, config) > 0
    )
