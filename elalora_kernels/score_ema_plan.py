"""The per-step score+EMA update of one fixed set of EMA tensors, planned once by its owner.

``RankAllocator`` builds one plan for its EMA views and calls :meth:`update`
every step. The backend (chosen by :mod:`elalora_kernels.dispatch`) may keep a
launch plan for them: the Triton one keeps its pointer table on the device,
current from C++ (see ``elalora_kernels/triton/score_ema.py``), and the
non-finite count accumulates on the device, so a step costs no per-tensor
Python work, no allocation and no sync. The other backends (the CPU
extension, the reference) update per call and return the count at no extra cost.
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
        # Replaces the device launch of a backend plan made after it is set: with a stub,
        # benchmarks/gpu.py --host-only measures the host time of a step on any machine.
        self.launcher = None
        self._plans: dict = {}  # backend name -> its launch plan, or None where it updates per call

    @torch.no_grad()
    def update(self, weights: Sequence[Tensor], grads: Optional[Sequence[Tensor]] = None) -> Optional[int]:
        """One step, in place on the EMAs; ``grads=None`` reads each weight's ``.grad`` (zeros if None).

        With ``grads=None`` the weights must be the same tensors at every step. Returns the number of
        non-finite ``|w·g|`` elements where it is free, or None where it accumulates on the device
        (read it with :meth:`read_nonfinite`).
        """
        backend = dispatch.backend_for(self.device)
        if backend not in self._plans:
            self._plans[backend] = dispatch.score_ema_launch_plan(self.ema_ipt, self.ema_unc, self.launcher)
        plan = self._plans[backend]
        if plan is None:
            grads = grads if grads is not None else grads_of(weights)
            return dispatch.score_ema_update(weights, grads, self.ema_ipt, self.ema_unc, self.beta1, self.beta2)
        plan.update(weights, grads, self.beta1, self.beta2)
        return None

    def read_nonfinite(self) -> int:
        """Non-finite elements counted on the device since the last read (one sync), 0 if none is pending."""
        return sum(plan.read_count() for plan in self._device_plans())

    def take_nonfinite(self) -> Optional[Tensor]:
        """The device count since the last read as an int64 tensor, reset, with no sync (a round brings it to the
        host with its scores in one transfer); None where nothing counts on the device."""
        counts = [plan.count for plan in self._device_plans()]
        if not counts:
            return None
        total = torch.stack(counts).sum(dtype=torch.int64).reshape(1)
        for count in counts:
            count.zero_()
        return total

    @property
    def rebuilds(self) -> int:
        """How many times a device pointer table was written (tests, benchmarks)."""
        return sum(plan.rebuilds for plan in self._device_plans())

    def points_at_current_grads(self) -> bool:
        """Whether the device launch points at every weight's present ``.grad``: a captured CUDA graph
        replays correctly exactly while this holds (see ``elalora_kernels.triton.score_ema.LaunchPlan``)."""
        return any(plan.current() for plan in self._device_plans())

    @property
    def aligned(self) -> bool:
        """Whether every device launch was told that all its addresses are 16-byte aligned (benchmarks)."""
        plans = list(self._device_plans())
        return bool(plans) and all(plan.aligned for plan in plans)

    def _device_plans(self):
        return (plan for plan in self._plans.values() if plan is not None)
