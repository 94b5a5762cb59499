"""The allocator's per-step score+EMA update on the GPU: tables and non-finite count resident on the device.

The first step fixes the rows of one device pointer table (grouped by dtype,
one launch per group) and its block tables. Every step then refreshes the
table (:mod:`.pointer_table`: in C++, uploaded only when a gradient moved) and
launches: no per-tensor Python work, no allocation, no sync. Non-finite
elements accumulate in the int32 device counter ``count`` until read.

CUDA graphs: a captured step replays the table as it was uploaded, and the
table holds no reference to the gradients (that would move the freeing of
the last step's gradients into this one). A replay is therefore correct
exactly while every parameter keeps the gradient tensor the table points
at: gradients kept with ``zero_grad(set_to_none=False)``, or the backward
captured in the same graph (its memory pool gives every replay the same
addresses). :meth:`ResidentScoreEma.current` says whether that holds now. A
step captured while it does not hold (or before the first eager step) is
refused with an error: its upload would be captured as a copy from pinned host
memory, which the replays would read long after that memory was reused.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor

from elalora_kernels._grads import grads_of

from . import _common, score_ema_kernel
from .pointer_table import pointer_table
from .score_ema import score_ema_update_async, update_with_torch
from .score_ema_tables import LaunchTables, block_tables


class ResidentScoreEma:
    """The update of one fixed list of EMA tensors (the allocator's), step after step.

    ``launcher(tables, count, beta1, beta2)`` launches (default: the kernel; a stub measures host time).
    """

    def __init__(self, ema_ipt: Sequence[Tensor], ema_unc: Sequence[Tensor], launcher=None) -> None:
        self.ema_ipt, self.ema_unc = list(ema_ipt), list(ema_unc)
        self.device = self.ema_ipt[0].device
        self.count = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.launcher = launcher or score_ema_kernel.launch
        self.table = None  # the pointer table, made at the first step; None: a layout the kernel does not take
        self._launches: list[tuple[LaunchTables, list[int]]] = []  # tables of each dtype group, and its rows
        self._planned = False

    @property
    def uploads(self) -> int:
        """How many times the device pointer table was written."""
        return self.table.uploads if self.table is not None else 0

    @property
    def aligned(self) -> bool:
        """Whether the launches were told that all their addresses are 16-byte aligned."""
        return self.table is not None and self.table.aligned

    def current(self) -> bool:
        """Whether the device table points at every weight's present ``.grad`` (a graph replay is then correct)."""
        return self.table is not None and self.table.current()

    def update(self, weights: Sequence[Tensor], grads: Sequence[Tensor] | None, beta1: float, beta2: float) -> None:
        """One step; ``grads=None`` reads each weight's ``.grad`` (the weights of the first step)."""
        if _common.capturing(self.device):
            self._check_capturable(grads)
        if not self._planned:
            self._plan(weights)
        status = -1
        if self.table is not None:
            status = self.table.refresh() if grads is None else self.table.refresh_with(list(weights), list(grads))
        if status < 0:  # a layout the kernel does not take: correct, not fast
            grads = grads if grads is not None else grads_of(weights)
            self.count += score_ema_update_async(weights, grads, self.ema_ipt, self.ema_unc, beta1, beta2)
            return
        for tables, rows in self._launches:
            tables.aligned = self.table.aligned
            _common.run_or_fall_back(
                ("score_ema", tables.w_dtype), lambda: self.launcher(tables, self.count, beta1, beta2),
                lambda: update_with_torch(self._quads(weights, grads, rows), self.count, beta1, beta2),
            )

    def read_count(self) -> int:
        """Non-finite elements since the last read (one device sync); resets the counter."""
        n = int(self.count.item())
        self.count.zero_()
        return n

    def take_count(self) -> Tensor:
        """The count since the last read as a new int64 [1] device tensor, with no sync; resets the counter."""
        taken = self.count.sum(dtype=torch.int64).reshape(1)
        self.count.zero_()
        return taken

    def _check_capturable(self, grads) -> None:
        """Under CUDA graph capture the table must already be on the device and point at the present gradients."""
        if not self._planned or (self.table is not None and (grads is not None or not self.table.current())):
            raise RuntimeError(
                "elalora: an allocator step is being captured in a CUDA graph, but the score+EMA pointer table does "
                "not point at the present gradients (or was never built), and uploading it inside a capture would "
                "replay stale addresses. Run one step eagerly first with the gradient tensors the graph will use: "
                "keep them with zero_grad(set_to_none=False), or capture the backward in the same graph."
            )

    def _quads(self, weights, grads, rows):
        """(w, g, Ī, Ū) of the tensors ``rows`` (``grads=None``: each weight's own .grad)."""
        gs = grads_of([weights[k] for k in rows]) if grads is None else [grads[k] for k in rows]
        return [(weights[k].detach(), g, self.ema_ipt[k], self.ema_unc[k]) for k, g in zip(rows, gs)]

    def _plan(self, weights: Sequence[Tensor]) -> None:
        self._planned = True
        if len(weights) != len(self.ema_ipt):
            raise ValueError(f"score_ema: {len(weights)} weights for {len(self.ema_ipt)} EMA tensors")
        rows = [k for k, w in enumerate(weights) if w.numel()]
        if not rows or not all(
            score_ema_kernel.takes(weights[k], weights[k], self.ema_ipt[k], self.ema_unc[k])
            and weights[k].device == self.device
            for k in rows
        ):
            return
        rows.sort(key=lambda k: str(weights[k].dtype))  # stable: each dtype's rows form one slice of the table
        ptrs = torch.zeros((len(rows), 4), dtype=torch.int64, device=self.device)
        self.table = pointer_table(list(weights), self.ema_ipt, self.ema_unc, rows, ptrs)
        start = 0
        for dtype, members in itertools.groupby(rows, key=lambda k: weights[k].dtype):
            group = rows[start : start + len(list(members))]
            numels, blocks = block_tables(tuple(weights[k].numel() for k in group), self.device)
            self._launches.append((LaunchTables(ptrs[start : start + len(group)], numels, blocks, dtype, dtype, False), group))
            start += len(group)
