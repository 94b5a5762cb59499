"""The per-step score+EMA update of one fixed set of EMA tensors, planned once by its owner.

``RankAllocator`` builds one plan for its EMA views and calls :meth:`update`
every step. On the Triton backend the plan keeps the launch tables on the
device (rebuilt only when a weight's or gradient's address changes) and the
non-finite count accumulates on the device, so a step costs a comparison of
addresses and a launch — no host-to-device copy, no allocation, no sync — and
can be captured in a CUDA graph. On the other backends (the CPU extension, the
reference) the count comes back with the update at no extra cost.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import dispatch


class ScoreEmaPlan:
    def __init__(self, ema_ipt: Sequence[Tensor], ema_unc: Sequence[Tensor], beta1: float, beta2: float, launcher=None):
        """``launcher`` replaces the Triton launch (a stub measures the host time of a step)."""
        self.ema_ipt, self.ema_unc = list(ema_ipt), list(ema_unc)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.device = self.ema_ipt[0].device
        self._launcher = launcher
        self._device_plan = None  # the Triton LaunchPlan, made at the first Triton step

    def update(self, weights: Sequence[Tensor], grads: Sequence[Tensor]) -> Optional[int]:
        """One step, in place on the EMAs. Returns the number of non-finite ``|w·g|`` elements
        where it is free, or None where it accumulates on the device (read it with :meth:`read_nonfinite`)."""
        if dispatch.backend_for(self.device) != "triton":
            return dispatch.score_ema_update(weights, grads, self.ema_ipt, self.ema_unc, self.beta1, self.beta2)
        if self._device_plan is None:
            from .triton.score_ema import LaunchPlan

            self._device_plan = LaunchPlan(self.ema_ipt, self.ema_unc, self._launcher)
        self._device_plan.update(weights, grads, self.beta1, self.beta2)
        return None

    def read_nonfinite(self) -> int:
        """Non-finite elements counted on the device since the last read (one sync), 0 if none is pending."""
        return self._device_plan.read_count() if self._device_plan is not None else 0

    @property
    def rebuilds(self) -> int:
        """How many times the device launch tables were built (tests, benchmarks)."""
        return self._device_plan.rebuilds if self._device_plan is not None else 0
