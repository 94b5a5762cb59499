"""docs/ALGORITHM.md §2 — score + EMA update for every adapter tensor in ONE launch.

Layout (the ``multi_tensor_apply`` idea with a device pointer table):

* ``ptrs``  int64 [T, 4]: addresses of (w, g, Ī, Ū) of each tensor;
* ``numel`` int64 [T];
* ``blocks`` int64 [B, 2]: (tensor index, first element) of each program.

One program updates ``BLOCK`` consecutive elements of one tensor: one read of
w, g, Ī, Ū and one write of Ī, Ū per element. Both tables are cached: the block
table per tuple of sizes, the pointer table per tuple of addresses. The
allocator's per-step update goes through :class:`LaunchPlan` instead, which
owns its tables and keeps the pointer table current from C++.
When every address is 16-byte aligned the kernel is told so, and the compiler
emits 16-byte vector loads.

Arithmetic is float32 in the reference's order, ``β·Ī + (1−β)·ipt``, with the
scalars rounded to float32 as torch rounds them, and FMA contraction disabled
at launch: float32 results are bit-identical to ``reference.score_ema_update``.
A non-finite ``|w·g|`` keeps its EMAs and is counted (one atomic per program).

The same tables drive the plain-CUDA kernel of ``csrc/cuda/score_ema.cu``
(``elalora_kernels._C_cuda``, built when torch has CUDA); it is used instead
of the Triton kernel when ``ELALORA_SCORE_EMA=cuda`` (``benchmarks/gpu.py``
times both, so the faster one can be made the default from a measurement).
"""
from __future__ import annotations

import importlib
import itertools
import os
from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from elalora_kernels import _extension, reference
from elalora_kernels._grads import grads_of

from . import _common
from ._common import TL_DTYPE, interpreting

BLOCK = 4096  # elements per program: 8 warps x 32 threads x 16 elements (4 x 16-byte loads each for fp32)
_CACHE_SIZE = 8


@triton.jit
def _update_block(w_ptr, g_ptr, i_ptr, u_ptr, offs, n, beta1, one_minus_beta1, beta2, one_minus_beta2, MASKED: tl.constexpr):
    if MASKED:  # the tail of a tensor
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ema_i = tl.load(i_ptr + offs, mask=mask, other=0.0)
        ema_u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    else:  # a full block: unmasked, so aligned loads vectorise
        w = tl.load(w_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        ema_i = tl.load(i_ptr + offs)
        ema_u = tl.load(u_ptr + offs)

    ipt = tl.abs(w * g)
    finite = ipt < float("inf")  # ipt >= 0, so this is False exactly for inf and nan
    new_i = beta1 * ema_i + one_minus_beta1 * ipt
    new_u = beta2 * ema_u + one_minus_beta2 * tl.abs(ipt - new_i)
    if MASKED:
        tl.store(i_ptr + offs, tl.where(finite, new_i, ema_i), mask=mask)
        tl.store(u_ptr + offs, tl.where(finite, new_u, ema_u), mask=mask)
        bad = tl.sum((mask & (finite == 0)).to(tl.int32), axis=0)
    else:
        tl.store(i_ptr + offs, tl.where(finite, new_i, ema_i))
        tl.store(u_ptr + offs, tl.where(finite, new_u, ema_u))
        bad = tl.sum((finite == 0).to(tl.int32), axis=0)
    return bad


@triton.jit
def _score_ema_kernel(
    ptrs,  # int64 [T, 4]
    numels,  # int64 [T]
    blocks,  # int64 [B, 2]
    count,  # int32 [1]
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1)
    n = tl.load(numels + tid)
    w_addr = tl.load(ptrs + 4 * tid)
    g_addr = tl.load(ptrs + 4 * tid + 1)
    i_addr = tl.load(ptrs + 4 * tid + 2)
    u_addr = tl.load(ptrs + 4 * tid + 3)
    w_ptr = w_addr.to(tl.pointer_type(W_DTYPE))
    g_ptr = g_addr.to(tl.pointer_type(G_DTYPE))
    i_ptr = i_addr.to(tl.pointer_type(tl.float32))
    u_ptr = u_addr.to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every address is 16-byte aligned: lets the compiler emit 16-byte vector loads
        w_ptr = tl.multiple_of(w_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        i_ptr = tl.multiple_of(i_ptr, 16)
        u_ptr = tl.multiple_of(u_ptr, 16)

    offs = start + tl.arange(0, BLOCK)
    offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    if start + BLOCK <= n:
        bad = _update_block(w_ptr, g_ptr, i_ptr, u_ptr, offs, n, beta1, one_minus_beta1, beta2, one_minus_beta2, False)
    else:
        bad = _update_block(w_ptr, g_ptr, i_ptr, u_ptr, offs, n, beta1, one_minus_beta1, beta2, one_minus_beta2, True)
    if bad > 0:
        tl.atomic_add(count, bad)


class _Plan:
    """Device tables of one group of tensors (one launch)."""

    __slots__ = ("ptrs", "numels", "blocks", "nblocks", "aligned", "w_dtype", "g_dtype", "w_torch_dtype", "g_torch_dtype",
                 "device", "rows")


_block_cache: "OrderedDict[tuple, tuple[Tensor, Tensor]]" = OrderedDict()
_ptr_cache: "OrderedDict[tuple, _Plan]" = OrderedDict()


def _remember(cache: OrderedDict, key, value):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _block_tables(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    key = (numels, str(device))
    hit = _block_cache.get(key)
    if hit is not None:
        _block_cache.move_to_end(key)
        return hit
    counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
    tid = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(tid.numel(), dtype=torch.int64) - first[tid]) * BLOCK
    blocks = torch.stack([tid, start], dim=1).contiguous()
    numel_t = torch.tensor(numels, dtype=torch.int64)
    return _remember(_block_cache, key, (numel_t.to(device), blocks.to(device)))


def _plan(group: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> _Plan:
    addrs = tuple(t.data_ptr() for quad in group for t in quad)
    numels = tuple(quad[0].numel() for quad in group)
    device = group[0][0].device
    key = (addrs, numels, str(device), group[0][0].dtype, group[0][1].dtype)
    hit = _ptr_cache.get(key)
    if hit is not None:
        _ptr_cache.move_to_end(key)
        return hit
    return _remember(_ptr_cache, key, _build_plan(group))


def _build_plan(group: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> _Plan:
    addrs = [t.data_ptr() for quad in group for t in quad]
    device = group[0][0].device
    plan = _Plan()
    plan.numels, plan.blocks = _block_tables(tuple(quad[0].numel() for quad in group), device)
    plan.nblocks = plan.blocks.shape[0]
    plan.ptrs = torch.tensor(addrs, dtype=torch.int64).view(-1, 4).to(device)
    plan.aligned = all(a % 16 == 0 for a in addrs)
    plan.w_torch_dtype, plan.g_torch_dtype = group[0][0].dtype, group[0][1].dtype
    plan.w_dtype = TL_DTYPE[plan.w_torch_dtype]
    plan.g_dtype = TL_DTYPE[plan.g_torch_dtype]
    plan.device = device
    return plan


def _kernel_ok(w: Tensor, g: Tensor, i: Tensor, u: Tensor) -> bool:
    return (
        w.dtype in TL_DTYPE
        and g.dtype in TL_DTYPE
        and i.dtype == torch.float32
        and u.dtype == torch.float32
        and w.shape == g.shape == i.shape == u.shape
        and all(t.is_contiguous() for t in (w, g, i, u))
        and len({t.device for t in (w, g, i, u)}) == 1
        and (w.is_cuda or interpreting())
    )


_CUDA_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cuda/score_ema.h


def cuda_extension():
    """``elalora_kernels._C_cuda`` if it was built, else None."""
    try:
        return importlib.import_module("elalora_kernels._C_cuda")
    except ImportError:
        return None


def _use_cuda_extension(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("ELALORA_SCORE_EMA", "triton") == "cuda" and cuda_extension() is not None


def launch(plan: _Plan, count: Tensor, beta1: float, beta2: float) -> None:
    """One launch over the tensors of ``plan``; adds the non-finite elements to ``count`` (int32 [1])."""
    _common.check_dtype_supported(plan.device, plan.w_torch_dtype)
    _common.check_dtype_supported(plan.device, plan.g_torch_dtype)
    b1, b2 = float(beta1), float(beta2)
    if _use_cuda_extension(plan.device):
        cuda_extension().score_ema_launch(  # the binding guards the device itself
            plan.ptrs, plan.numels, plan.blocks, count, _CUDA_DTYPE[plan.w_torch_dtype], _CUDA_DTYPE[plan.g_torch_dtype],
            plan.aligned, b1, 1.0 - b1, b2, 1.0 - b2,
        )
        return
    with _common.launch_guard(plan.device):
        _score_ema_kernel[(plan.nblocks,)](
            plan.ptrs, plan.numels, plan.blocks, count,
            b1, 1.0 - b1, b2, 1.0 - b2,
            W_DTYPE=plan.w_dtype, G_DTYPE=plan.g_dtype, BLOCK=BLOCK, ALIGNED=plan.aligned,
            num_warps=8,
            enable_fp_fusion=False,  # keep β·Ī + (1−β)·ipt as torch computes it: no FMA
        )


class LaunchPlan:
    """The update of one fixed list of EMA tensors (the allocator's), planned once.

    The first step fixes the rows of one device pointer table (grouped by dtype,
    one launch per group) and its block tables. Every step then refreshes the
    table: ``elalora_kernels._C.PointerTable`` reads each weight's ``.grad`` in
    C++, compares the addresses and, only when one moved (as after
    ``zero_grad(set_to_none=True)``), uploads the table with one asynchronous
    copy — no per-tensor Python work, no sync. Non-finite elements accumulate in
    the int32 device counter ``count`` until someone reads it (:meth:`read_count`).
    ``launcher`` is the function that launches (a stub measures host time).

    CUDA graphs: a captured step replays the table as it was uploaded, and the
    table holds no reference to the gradients (that would move the freeing of
    the last step's gradients into this one). A replay is therefore correct
    exactly while every parameter keeps the gradient tensor the table points
    at: gradients kept with ``zero_grad(set_to_none=False)``, or the backward
    captured in the same graph (its memory pool gives every replay the same
    addresses). :meth:`current` says whether that holds now. A step captured while
    it does not hold (or before the first eager step) is refused with an error:
    its upload would be captured as a copy from pinned host memory, which the
    replays would read long after that memory was reused.
    """

    def __init__(self, ema_ipt: Sequence[Tensor], ema_unc: Sequence[Tensor], launcher=None) -> None:
        self.ema_ipt, self.ema_unc = list(ema_ipt), list(ema_unc)
        self.device = self.ema_ipt[0].device
        self.count = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.launcher = launcher or launch
        self._table = None  # the PointerTable, made at the first step; None: a layout the kernel does not take
        self._plans: list[_Plan] = []
        self._planned = False

    @property
    def rebuilds(self) -> int:
        """How many times the device pointer table was written."""
        return self._table.uploads if self._table is not None else 0

    @property
    def aligned(self) -> bool:
        return self._table is not None and self._table.aligned

    def current(self) -> bool:
        """Whether the device table points at every weight's present ``.grad`` (a graph replay is then correct)."""
        return self._table is not None and self._table.current()

    def update(self, weights: Sequence[Tensor], grads: Sequence[Tensor] | None, beta1: float, beta2: float) -> None:
        """One step; ``grads=None`` reads each weight's ``.grad`` (the weights of the first step)."""
        if _common.capturing(self.device):
            self._check_capturable(grads)
        if not self._planned:
            self._plan_rows(weights)
        status = -1
        if self._table is not None:
            status = self._table.refresh() if grads is None else self._table.refresh_with(list(weights), list(grads))
        if status < 0:  # a layout the kernel does not take: correct, not fast
            grads = grads if grads is not None else grads_of(weights)
            self.count += score_ema_update_async(weights, grads, self.ema_ipt, self.ema_unc, beta1, beta2)
            return
        aligned = self._table.aligned
        for plan in self._plans:
            plan.aligned = aligned
            _common.run_or_fall_back(
                ("score_ema", plan.w_torch_dtype), lambda: self.launcher(plan, self.count, beta1, beta2),
                lambda: _update_torch(self._quads(weights, grads, plan.rows), self.count, beta1, beta2),
            )

    def _check_capturable(self, grads) -> None:
        """Under CUDA graph capture the table must already be on the device and point at the present gradients."""
        if not self._planned or (self._table is not None and (grads is not None or not self._table.current())):
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

    def read_count(self) -> int:
        """Non-finite elements since the last read (one device sync); resets the counter."""
        n = int(self.count.item())
        self.count.zero_()
        return n

    def _plan_rows(self, weights: Sequence[Tensor]) -> None:
        self._planned = True
        if len(weights) != len(self.ema_ipt):
            raise ValueError(f"score_ema LaunchPlan: {len(weights)} weights for {len(self.ema_ipt)} EMA tensors")
        rows = [k for k, w in enumerate(weights) if w.numel()]
        if not rows or not all(
            _kernel_ok(weights[k], weights[k], self.ema_ipt[k], self.ema_unc[k]) and weights[k].device == self.device
            for k in rows
        ):
            return
        rows.sort(key=lambda k: str(weights[k].dtype))  # stable: each dtype's rows form one slice of the table
        table = torch.zeros((len(rows), 4), dtype=torch.int64, device=self.device)
        self._table = pointer_table(list(weights), self.ema_ipt, self.ema_unc, rows, table)
        start = 0
        for dtype, members in itertools.groupby(rows, key=lambda k: weights[k].dtype):
            numels = tuple(weights[k].numel() for k in members)
            plan = _Plan()
            plan.numels, plan.blocks = _block_tables(numels, self.device)
            plan.nblocks = plan.blocks.shape[0]
            plan.ptrs = table[start : start + len(numels)]
            plan.w_torch_dtype = plan.g_torch_dtype = dtype
            plan.w_dtype = plan.g_dtype = TL_DTYPE[dtype]
            plan.device = self.device
            plan.rows = rows[start : start + len(numels)]
            self._plans.append(plan)
            start += len(numels)


def pointer_table(params, ema_ipt, ema_unc, rows, table):
    """``elalora_kernels._C.PointerTable`` (``csrc/pointer_table.cpp``), or its Python stand-in without the extension."""
    ext = _extension.load()
    if ext is not None:
        return ext.PointerTable(params, ema_ipt, ema_unc, rows, table)
    return _PythonPointerTable(params, ema_ipt, ema_unc, rows, table)


class _PythonPointerTable:
    """What ``csrc/pointer_table.cpp`` does, where the extension is not built: it visits every tensor in Python."""

    def __init__(self, params, ema_ipt, ema_unc, rows, table):
        self.params, self.rows, self.table = params, rows, table
        self.emas = [(ema_ipt[k], ema_unc[k]) for k in rows]
        self.dtypes = [params[k].dtype for k in rows]
        self.addresses: list[int] | None = None
        self.aligned = False
        self.uploads = 0

    def refresh(self) -> int:
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


def score_ema_update_async(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ema_ipt: Sequence[Tensor],
    ema_unc: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> Tensor:
    """The update without a host sync: returns the non-finite count as an int32 device tensor."""
    if not (len(params) == len(grads) == len(ema_ipt) == len(ema_unc)):
        raise ValueError("score_ema_update: params, grads, ema_ipt and ema_unc must have equal lengths")
    device = params[0].device if len(params) else torch.device("cpu")
    count = torch.zeros(1, dtype=torch.int32, device=device)
    groups: dict[tuple, list] = {}
    for quad in zip(params, grads, ema_ipt, ema_unc):
        w, g, i, u = (t.detach() for t in quad)
        if w.numel() == 0:
            continue
        if not _kernel_ok(w, g, i, u):  # odd layouts: correct, not fast
            count += reference.score_ema_update([w], [g], [i], [u], beta1, beta2)
            continue
        groups.setdefault((w.dtype, g.dtype, w.device), []).append((w, g, i, u))
    for (dtype, _, _), group in groups.items():
        _common.run_or_fall_back(("score_ema", dtype), lambda: launch(_plan(group), count, beta1, beta2),
                                 lambda: _update_torch(group, count, beta1, beta2))
    return count


def _update_torch(quads, count: Tensor, beta1: float, beta2: float) -> None:
    """The fallback: ``reference.score_ema_update_one`` per tensor, the count kept on the device."""
    for w, g, i, u in quads:
        count += reference.score_ema_update_one(w, g, i, u, beta1, beta2)


def score_ema_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ema_ipt: Sequence[Tensor],
    ema_unc: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> int:
    """``reference.score_ema_update`` in one launch; returns the number of non-finite elements."""
    if len(params) == 0:
        return 0
    return int(score_ema_update_async(params, grads, ema_ipt, ema_unc, beta1, beta2).item())
