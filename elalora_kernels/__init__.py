"""Tensor-level ElaLoRA ops: no nn.Module and no model knowledge.

Every op has an eager version in :mod:`elalora_kernels.reference` and a fast
one chosen per call by :mod:`elalora_kernels.dispatch`.
"""
from .dispatch import (
    BACKENDS,
    adapter_add,
    adapter_linear,
    backend_for,
    orth_penalty,
    rank_scores,
    score_ema_update,
    set_backend,
    use_backend,
)
from .limits import MAX_R_MAX
from .score_ema_plan import ScoreEmaPlan

__all__ = [
    "BACKENDS",
    "MAX_R_MAX",
    "ScoreEmaPlan",
    "adapter_add",
    "adapter_linear",
    "backend_for",
    "orth_penalty",
    "rank_scores",
    "score_ema_update",
    "set_backend",
    "use_backend",
]
