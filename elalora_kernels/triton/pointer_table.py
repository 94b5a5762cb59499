"""The pointer table of the allocator's per-step score+EMA launch, kept current at every step.

``elalora_kernels._C.PointerTable`` (csrc/pointer_table.cpp) reads every
weight's ``.grad`` in C++, compares the addresses with the last ones and, only
when one moved (as after ``zero_grad(set_to_none=True)``), uploads the table
with one asynchronous copy: no per-tensor Python work. Without the extension,
:class:`PythonPointerTable` does the same in Python, one tensor at a time.
"""
from __future__ import annotations

import torch

from elalora_kernels import _extension
from elalora_kernels._grads import grads_of


def pointer_table(params, ema_ipt, ema_unc, rows, table):
    """The table whose row k points at (w, g, Ī, Ū) of tensor ``rows[k]``, written into ``table`` (int64 [T, 4])."""
    ext = _extension.load()
    if ext is not None:
        return ext.PointerTable(params, ema_ipt, ema_unc, rows, table)
    return PythonPointerTable(params, ema_ipt, ema_unc, rows, table)


class PythonPointerTable:
    """What ``csrc/pointer_table.cpp`` does, where the extension is not built: it visits every tensor in Python."""

    def __init__(self, params, ema_ipt, ema_unc, rows, table):
        self.params, self.rows, self.table = params, rows, table
        self.emas = [(ema_ipt[k], ema_unc[k]) for k in rows]
        self.dtypes = [params[k].dtype for k in rows]
        self.addresses: list[int] | None = None
        self.aligned = False
        self.uploads = 0

    def refresh(self) -> int:
        """Point at every weight's present ``.grad``: 1 if the table was uploaded, 0 if current, -1 if a
        layout changed (the kernel does not take it)."""
        return self.refresh_with(self.params, grads_of(self.params))

    def current(self) -> bool:
        ws, gs = [self.params[k] for k in self.rows], [self.params[k].grad for k in self.rows]
        return self.addresses == [t.data_ptr() if t is not None else -1 for pair in zip(ws, gs) for t in pair]

    def refresh_with(self, weights, grads) -> int:
        ws, gs = [weights[k] for k in self.rows], [grads[k] for k in self.rows]
        if not all(w.is_contiguous() and g.is_contiguous() and w.dtype == d == g.dtype and w.device == g.device
                   and g.numel() == w.numel() for w, g, d in zip(ws, gs, self.dtypes)):
            return -1
        addresses = [t.data_ptr() for pair in zip(ws, gs) for t in pair]
        if addresses == self.addresses:
            return 0
        self.addresses = addresses
        rows = [(w.data_ptr(), g.data_ptr(), i.data_ptr(), u.data_ptr()) for w, g, (i, u) in zip(ws, gs, self.emas)]
        self.aligned = all(a % 16 == 0 for row in rows for a in row)
        self.table.copy_(torch.tensor(rows, dtype=torch.int64), non_blocking=True)
        self.uploads += 1
        return 1
