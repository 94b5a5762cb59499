"""Triton backend: the ops of :mod:`elalora_kernels.reference` for CUDA tensors.

Imported lazily by :mod:`elalora_kernels.dispatch` for CUDA tensors only (or
when ``ELALORA_BACKEND=triton``). Under ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors, which is how CI proves them without a GPU.

* ``adapter_linear``   — fused adapter forward + hand-written backward (``adapter_linear.py``); ``adapter_add``,
  its adapter-only mode for a base that runs as its own module (a quantized one)
* ``score_ema_update`` — every adapter tensor in one launch (``score_ema.py``, the kernel in
  ``score_ema_kernel.py``, its tables in ``score_ema_tables.py``); ``ResidentScoreEma``, the allocator's
  per-step version, whose tables stay on the device (``resident_score_ema.py``, ``pointer_table.py``);
  ``cuda_score_ema.py`` switches to the CUDA C++ kernel on request
* ``rank_scores``      — every matrix in one launch (``rank_scores.py``)
* ``orth_penalty``     — every P and Q in one launch forward, one backward (``orth_penalty.py``)
"""
from .adapter_linear import READS_PARAMETERS_IN_ANY_DTYPE, AdapterLinearFunction, adapter_add, adapter_linear
from .orth_penalty import orth_penalty
from .rank_scores import rank_scores
from .resident_score_ema import ResidentScoreEma
from .score_ema import score_ema_update, score_ema_update_async

__all__ = [
    "READS_PARAMETERS_IN_ANY_DTYPE",
    "AdapterLinearFunction",
    "ResidentScoreEma",
    "adapter_add",
    "adapter_linear",
    "orth_penalty",
    "rank_scores",
    "score_ema_update",
    "score_ema_update_async",
]
