"""The ``cpu`` backend: the C++ extension (``elalora_kernels._C``, csrc/*.cpp) where it pays, torch ops elsewhere.

* ``score_ema_update``: one OpenMP pass of the extension over every tensor (``score_ema.py``);
* ``orth_penalty``: value and gradients from one extension call (``orth_penalty.py``);
* ``adapter_linear`` / ``adapter_add``: the torch backend's autograd op (on the CPU, GEMMs are the work);
* ``rank_scores``: the reference's per matrix form, the EMAs read in place: on the CPU nothing
  waits on a device, so batching by shape only adds copies (benchmarks/RESULTS.md, "Measurements
  behind design choices").

Without the extension (not built) the torch backend's versions run, after one warning.
Every op has the signature of its :mod:`elalora_kernels.reference` twin.
"""
from ..reference import rank_scores
from ..torch_ops import AdapterLinearFunction, adapter_add, adapter_linear
from .orth_penalty import orth_penalty
from .score_ema import score_ema_update

__all__ = ["AdapterLinearFunction", "adapter_add", "adapter_linear", "orth_penalty", "rank_scores", "score_ema_update"]
