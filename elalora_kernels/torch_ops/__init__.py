"""The ``torch`` backend: every op in plain torch ops, for any device (CUDA without Triton, MPS, ...).

* ``adapter_linear`` / ``adapter_add``: one autograd op with a hand-written backward (``adapter_linear.py``);
* ``score_ema_update``: the elementwise update once over all tensors concatenated (``score_ema.py``);
* ``rank_scores`` / ``orth_penalty``: batched ops per distinct shape, nothing waits on the device (``batched.py``).

The CPU backend (:mod:`elalora_kernels.cpu`) reuses what of these pays on the
CPU, and runs its C++ extension elsewhere. Every op has the signature of its
:mod:`elalora_kernels.reference` twin.
"""
from .adapter_linear import AdapterLinearFunction, adapter_add, adapter_linear
from .batched import orth_penalty, rank_scores
from .score_ema import score_ema_update

__all__ = ["AdapterLinearFunction", "adapter_add", "adapter_linear", "orth_penalty", "rank_scores", "score_ema_update"]
