"""CPU backend (placeholder until the C++ extension lands: runs the reference ops)."""
from ..reference import adapter_linear, orth_penalty, rank_scores, score_ema_update  # noqa: F401
