"""docs/ALGORITHM.md §2: the Triton kernel that updates the score EMAs of many tensors in one launch.

The launch reads the tables of :mod:`.score_ema_tables`: program p updates
``BLOCK`` consecutive elements of one tensor, found through its row of
``blocks`` and the tensor's row of ``ptrs``: one read of w, g, Ī, Ū and one
write of Ī, Ū per element. When every address is 16-byte aligned the kernel is
told so, and the compiler emits 16-byte vector loads.

Arithmetic is float32 in the reference's order, ``β·Ī + (1−β)·ipt``, with the
scalars rounded to float32 as torch rounds them, and FMA contraction disabled
at launch: float32 results are bit-identical to ``reference.score_ema_update``.
A non-finite ``|w·g|`` keeps its EMAs and is counted (one atomic per program).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common, cuda_score_ema
from ._common import TL_DTYPE, interpreting

BLOCK = 4096  # elements per program: 8 warps x 32 threads x 16 elements (4 x 16-byte loads each for fp32)


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


def takes(w: Tensor, g: Tensor, i: Tensor, u: Tensor) -> bool:
    """Whether the kernel can update this tensor (other layouts take torch ops: correct, not fast)."""
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


def launch(tables, count: Tensor, beta1: float, beta2: float) -> None:
    """One launch over the tensors of ``tables`` (a ``LaunchTables``); adds the non-finite elements to ``count``
    (int32 [1]). ``ELALORA_SCORE_EMA=cuda`` runs the CUDA C++ kernel on the same tables instead."""
    _common.check_dtype_supported(tables.device, tables.w_dtype)
    _common.check_dtype_supported(tables.device, tables.g_dtype)
    b1, b2 = float(beta1), float(beta2)
    if cuda_score_ema.selected(tables.device):
        cuda_score_ema.launch(tables, count, b1, b2)
        return
    with _common.launch_guard(tables.device):
        _score_ema_kernel[(tables.blocks.shape[0],)](
            tables.ptrs, tables.numels, tables.blocks, count,
            b1, 1.0 - b1, b2, 1.0 - b2,
            W_DTYPE=TL_DTYPE[tables.w_dtype], G_DTYPE=TL_DTYPE[tables.g_dtype], BLOCK=BLOCK, ALIGNED=tables.aligned,
            num_warps=8,
            enable_fp_fusion=False,  # keep β·Ī + (1−β)·ipt as torch computes it: no FMA
        )
