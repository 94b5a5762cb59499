"""CPU backend: the C++ extension where it pays, torch ops elsewhere.

* ``score_ema_update``: one OpenMP pass of ``elalora_kernels._C`` over every
  tensor (vectorised torch fallback, with one warning, when it is not built);
* ``adapter_linear``: one autograd op with a hand-written backward;
* ``orth_penalty``: value and gradients from one C++ call (batched torch ops without it);
* ``rank_scores``: per matrix, straight into its row.

Every op has the signature of its :mod:`elalora_kernels.reference` twin.
"""
from ..batched import rank_scores
from .adapter_linear import AdapterLinearFunction, adapter_add, adapter_linear
from .orth_penalty import orth_penalty
from .score_ema import score_ema_update, torch_score_ema_update

__all__ = [
    "AdapterLinearFunction",
    "adapter_add",
    "adapter_linear",
    "orth_penalty",
    "rank_scores",
    "score_ema_update",
    "torch_score_ema_update",
]
