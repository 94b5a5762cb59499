"""docs/ALGORITHM.md §6 on the GPU: the orthogonality penalty in one launch forward, one backward.

Every Q [r_max, in] and every Pᵀ (P is [out, r_max]) is a set of row vectors,
one per slot; for the active rows R of one set, G = R Rᵀ − I and n = ‖G‖_F.
The penalty is c/(2M) Σ n, and its gradient on R is (c/M) · G R / n (zero
where n = 0, as torch's norm gives; zero on inactive rows).

A table holds each set's address, mask address, length and strides, so sets
of every shape share a launch (one per dtype): program u reads set u in
place, with inactive rows masked to zero. Forward keeps each set's G [r, r]
and n; backward reads the incoming gradient on the device (no host sync) and
writes every gradient, inactive rows as zeros, into one flat buffer. The table
depends only on where the parameters live, so it is built once per layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from elalora_kernels import torch_ops

from . import _common
from ._common import TL_DTYPE, check_device, interpreting, rank_block

COLUMNS = tl.constexpr(8)  # int64 per set in the table: data, mask, length, slot stride, position stride, grad offset, grad strides


@triton.jit
def _active(table_row, R, BLOCK_R: tl.constexpr):
    """The active mask of one set's slots, padded to BLOCK_R with False."""
    rr = tl.arange(0, BLOCK_R)
    return tl.load(tl.load(table_row + 1).to(tl.pointer_type(tl.int8)) + rr, mask=rr < R, other=0) != 0


@triton.jit
def _load_rows(table_row, active, d0, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """float32 [BLOCK_R, BLOCK_D]: one set's rows at positions d0.., inactive rows and the tail as 0."""
    data = tl.load(table_row + 0).to(tl.pointer_type(DTYPE))
    length = tl.load(table_row + 2)
    slot_stride = tl.load(table_row + 3)
    pos_stride = tl.load(table_row + 4)
    rr = tl.arange(0, BLOCK_R)
    dd = d0 + tl.arange(0, BLOCK_D)
    mask = active[:, None] & (dd < length)[None, :]
    return tl.load(data + rr[:, None] * slot_stride + dd[None, :] * pos_stride, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _forward_kernel(table, gram_out, norms, R, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    u = tl.program_id(0)
    row = table + COLUMNS * u
    length = tl.load(row + 2)
    active = _active(row, R, BLOCK_R)
    gram = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, length, BLOCK_D):
        x = _load_rows(row, active, d0, BLOCK_R, BLOCK_D, DTYPE)
        gram += tl.dot(x, tl.trans(x), input_precision="ieee")
    rr = tl.arange(0, BLOCK_R)
    eye = (rr[:, None] == rr[None, :]) & active[:, None]
    gram = gram - tl.where(eye, 1.0, 0.0)
    tl.store(gram_out + u * BLOCK_R * BLOCK_R + rr[:, None] * BLOCK_R + rr[None, :], gram)
    tl.store(norms + u, tl.sqrt(tl.sum(tl.sum(gram * gram, axis=1), axis=0)))


@triton.jit
def _backward_kernel(table, gram_in, norms, grad_output, grad_scale, flat_grad, R,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    u = tl.program_id(0)
    row = table + COLUMNS * u
    length = tl.load(row + 2)
    out = flat_grad + tl.load(row + 5)
    g_slot = tl.load(row + 6)
    g_pos = tl.load(row + 7)
    rr = tl.arange(0, BLOCK_R)
    gram = tl.load(gram_in + u * BLOCK_R * BLOCK_R + rr[:, None] * BLOCK_R + rr[None, :])
    norm = tl.load(norms + u)
    scale = tl.where(norm > 0, tl.load(grad_output) * grad_scale / tl.where(norm > 0, norm, 1.0), 0.0)
    active = _active(row, R, BLOCK_R)
    for d0 in range(0, length, BLOCK_D):
        x = _load_rows(row, active, d0, BLOCK_R, BLOCK_D, DTYPE)
        y = tl.dot(gram, x, input_precision="ieee") * scale
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = (rr < R)[:, None] & (dd < length)[None, :]
        tl.store(out + rr[:, None] * g_slot + dd[None, :] * g_pos, y.to(DTYPE), mask=mask)


class _Layout:
    """The table of one list of factors (built once per set of addresses), and the gradient buffer's views."""

    def __init__(self, Ps, Qs, actives):
        self.masks = [a.contiguous().view(torch.int8) for a in actives]  # kept: the table points into them
        rows, self.shapes, self.offsets, offset = [], [], [], 0
        for P, Q, mask in zip(Ps, Qs, self.masks):
            r = Q.shape[0]
            rows.append([Q.data_ptr(), mask.data_ptr(), Q.shape[1], Q.stride(0), Q.stride(1), offset + P.numel(), Q.shape[1], 1])
            rows.append([P.data_ptr(), mask.data_ptr(), P.shape[0], P.stride(1), P.stride(0), offset, 1, r])
            self.shapes += [P.shape, Q.shape]
            self.offsets += [offset, offset + P.numel()]
            offset += P.numel() + Q.numel()
        self.size = offset
        self.table = torch.tensor(rows, dtype=torch.int64).to(Ps[0].device)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Every P's gradient, then every Q's."""
        grads = [flat[o : o + s.numel()].view(s) for o, s in zip(self.offsets, self.shapes)]
        return grads[0::2] + grads[1::2]


_LAYOUTS: dict[tuple, _Layout] = {}


def _layout(Ps, Qs, actives) -> _Layout:
    key = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in (*Ps, *Qs, *actives))
    if key not in _LAYOUTS:
        _LAYOUTS.clear()  # a training run has one layout; a new one means the old tensors are gone
        _LAYOUTS[key] = _Layout(Ps, Qs, actives)
    return _LAYOUTS[key]


def _config(r: int) -> tuple[int, int]:
    block_r = rank_block(r)
    block_d = 16 if interpreting() else max(16, min(128, 4096 // block_r))
    return block_r, block_d


class OrthPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, actives, coeff, *factors):
        M = len(actives)
        Ps, Qs = factors[:M], factors[M:]
        layout = _layout(Ps, Qs, actives)
        r = Qs[0].shape[0]
        block_r, block_d = _config(r)
        sets = 2 * M
        gram = _common.empty((sets, block_r, block_r), torch.float32, Ps[0].device)
        norms = _common.empty((sets,), torch.float32, Ps[0].device)
        _forward_kernel[(sets,)](layout.table, gram, norms, r, BLOCK_R=block_r, BLOCK_D=block_d,
                                 DTYPE=TL_DTYPE[Ps[0].dtype], enable_fp_fusion=False)
        ctx.layout, ctx.coeff, ctx.r = layout, coeff, r
        ctx.save_for_backward(gram, norms, *factors)
        return norms.sum() * (coeff / (2 * M))

    @staticmethod
    def backward(ctx, grad_output):
        gram, norms, *factors = ctx.saved_tensors
        layout, M = ctx.layout, len(factors) // 2
        block_r, block_d = _config(ctx.r)
        flat = _common.empty((layout.size,), factors[0].dtype, factors[0].device)
        _backward_kernel[(2 * M,)](layout.table, gram, norms, grad_output.float().contiguous(), ctx.coeff / M, flat,
                                   ctx.r, BLOCK_R=block_r, BLOCK_D=block_d, DTYPE=TL_DTYPE[factors[0].dtype],
                                   enable_fp_fusion=False)
        return (None, None, *layout.views(flat))


def orth_penalty(Ps: Sequence[Tensor], Qs: Sequence[Tensor], actives: Sequence[Tensor], coeff: float) -> Tensor:
    """``reference.orth_penalty`` in one launch per direction: float32 scalar, differentiable in every P and Q."""
    if not (len(Ps) == len(Qs) == len(actives)):
        raise ValueError(f"orth_penalty: {len(Ps)} P, {len(Qs)} Q and {len(actives)} active masks")
    if not Ps:
        raise ValueError("orth_penalty: no matrices")
    check_device(*Ps, *Qs, *actives)
    dtypes = {t.dtype for t in (*Ps, *Qs)}
    r_maxes = {Q.shape[0] for Q in Qs} | {P.shape[1] for P in Ps}
    if len(dtypes) != 1 or dtypes.pop() not in TL_DTYPE or len(r_maxes) != 1:
        return torch_ops.orth_penalty(Ps, Qs, actives, coeff)  # mixed or float64 factors: rare, torch ops
    device = Ps[0].device

    def launch():
        with _common.launch_guard(device):
            return OrthPenaltyFunction.apply(tuple(actives), float(coeff), *Ps, *Qs)

    return _common.run_or_fall_back(("orth_penalty", rank_block(r_maxes.pop())), launch,
                                    lambda: torch_ops.orth_penalty(Ps, Qs, actives, coeff))
