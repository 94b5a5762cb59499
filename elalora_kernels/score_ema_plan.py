"""The per-step score+EMA update of one fixed set of EMA tensors, planned once by its owner.

``RankAllocator`` builds one plan for its EMA views and calls :meth:`update`
every step, on whichever backend :mod:`elalora_kernels.dispatch` picks then.
Where the backend has a resident update (Triton's ``ResidentScoreEma``: its
pointer table kept on the device, current from C++, the non-finite count
accumulated on the device), a step costs no per-tensor Python work, no
allocation and no sync. The other backends (the CPU extension, torch ops, the
reference) update per call and return the count at no extra cost.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import dispatch
from ._grads import grads_of


class ScoreEmaPlan:
    def __init__(self, ema_ipt: Sequence[Tensor], ema_unc: Sequence[Tensor], beta1: float, beta2: float):
        self.ema_ipt, self.ema_unc = list(ema_ipt), list(ema_unc)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.device = self.ema_ipt[0].device
        # Replaces the device launch of the resident update made after it is set: with a stub,
        # benchmarks/gpu.py --host-only measures the host time of a step on any machine.
        self.launcher = None
        # The backend's resident update (its table uploads and alignment: tests, benchmarks), made at the
        # first step on a backend that has one; None until then.
        self.resident = None

    @torch.no_grad()
    def update(self, weights: Sequence[Tensor], grads: Optional[Sequence[Tensor]] = None) -> Optional[int]:
        """One step, in place on the EMAs; ``grads=None`` reads each weight's ``.grad`` (zeros if None).

        With ``grads=None`` the weights must be the same tensors at every step. Returns the number of
        non-finite ``|w·g|`` elements where it is free, or None where it accumulates on the device
        (read it with :meth:`read_nonfinite`).
        """
        resident_type = dispatch.resident_score_ema(self.device)
        if resident_type is None:
            grads = grads if grads is not None else grads_of(weights)
            return dispatch.score_ema_update(weights, grads, self.ema_ipt, self.ema_unc, self.beta1, self.beta2)
        if self.resident is None:
            self.resident = resident_type(self.ema_ipt, self.ema_unc, self.launcher)
        self.resident.update(weights, grads, self.beta1, self.beta2)
        return None

    def read_nonfinite(self) -> int:
        """Non-finite elements counted on the device since the last read (one sync), 0 if none is pending."""
        return self.resident.read_count() if self.resident is not None else 0

    def take_nonfinite(self) -> Optional[Tensor]:
        """The device count since the last read as an int64 [1] tensor, reset, with no sync (a round brings it to
        the host with its scores in one transfer); None where nothing counts on the device."""
        return self.resident.take_count() if self.resident is not None else None

    def points_at_current_grads(self) -> bool:
        """Whether the device launch points at every weight's present ``.grad``: a captured CUDA graph replays
        correctly exactly while this holds (see ``elalora_kernels/triton/resident_score_ema.py``)."""
        return self.resident is not None and self.resident.current()
