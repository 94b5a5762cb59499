"""docs/ALGORITHM.md §1 — the adapted linear layer, forward and hand-written backward.

    y = x W0ᵀ + bias + s·((dropout(x) Qᵀ) ⊙ λ_eff) Pᵀ,    λ_eff = λ·active

The layer passes its full-size parameters P [out, r_max], λ [r_max], Q [r_max, in]
and its active rank ``r`` as a runtime value: the kernels compute with slots
[0, r) and write zeros into the gradients of the others, so autograd sees no
slicing (no ``slice_backward``: a zero fill and a copy per parameter). The
parameters are read in their own dtype (float32 under autocast) and cast to
the compute dtype (x's) inside the kernels; the gradients are written in the
parameters' dtype, straight into full-size buffers that ``.grad`` takes over.

Forward: the base GEMM is cuBLAS (``F.linear``); then ONE Triton kernel, per
tile of rows, accumulates ``xq = x Qᵀ`` in registers (rank dimension padded
to a power of two ≥ 16 and masked with ``r``), stores that N×r float32 tile
once (saved for backward), scales it by ``s·λ_eff`` and adds ``t Pᵀ`` into
the base output tiles in place: no N×out temporary.

Backward (``g = ∂L/∂y``), cuBLAS ``g W0`` then three launches:

* ``_tn`` for ``dP = gᵀ (s·xq ⊙ λ_eff)``;
* ``_bwd_dx``: per row tile, ``gp = g P`` once; from it ``u = s·gp ⊙ λ_eff``
  (stored, N×r), ``dx += u Q`` accumulated in place into ``g W0``, and
  ``dλ = s·active ⊙ Σ_n gp ⊙ xq``;
* ``_tn`` for ``dQ = uᵀ x``.

Adapter-only mode (``adapter_add``: no ``weight``, a base output ``y0`` computed
by the base's own module, e.g. a bitsandbytes 4-bit or 8-bit layer): the
forward kernel reads ``y0`` tiles and writes ``y0 + t Pᵀ`` into a new output of
y0's dtype (still no N×out temporary); the backward has no base GEMM, so
``_bwd_dx`` writes ``dx = u Q`` instead of adding it, and ``∂L/∂y0 = g`` lets
the base's own backward add its part of x's gradient through autograd.

Reductions over N (dP, dQ, dλ) are split over programs for parallelism; each
program stores its float32 partial, and the last program to arrive at a tile
(an atomic counter, reset by that program) sums the partials in a fixed order
and writes the result: deterministic, and one launch.

Why separate kernels and not a fused GEMM epilogue or a K-concatenated GEMM:
the bytes each arrangement moves are counted in benchmarks/RESULTS.md (GPU,
"Design note" and "design floor"); the choice stands until ``benchmarks/gpu.py`` has timed a GPU.

Matmul operands are in the compute dtype (bf16/fp16 use tensor cores; fp32 uses
IEEE fp32, never TF32, as torch does by default), accumulation is fp32. Ranks
change at run time: ``r`` is a runtime argument; only its power-of-two block is
a compile-time constant. Dropout (p > 0) is drawn on the host with
``F.dropout`` first, exactly like the reference, so one seed gives one mask.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import check_device, check_rank, interpreting, num_sms, rank_block, shared_memory


# --------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation; IEEE fp32 (no TF32) for fp32 inputs.

    ``UPCAST`` is set only under the interpreter, whose numpy dot cannot take
    bfloat16: the operands are widened exactly to fp32 there.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out

@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even.

    Under the interpreter (``UPCAST``) an fp32 -> bf16 cast truncates, so the
    value is first rounded to nearest-even bf16 by hand (exact afterwards).
    """
    if UPCAST:
        if x.dtype == tl.float32 and dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _rows_times_rank_matrix(
    a_ptr, stride_an, rows, row_mask, b_ptr, stride_bk, stride_br, rr, r_mask, K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """``A[rows, :K] · B[:K, rr]`` in fp32, B read through its strides and cast to A's dtype: x·Qᵀ, g·P."""
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        at = tl.load(a_ptr + rows[:, None] * stride_an + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + ks[:, None] * stride_bk + rr[None, :] * stride_br, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _dot(at, _cast(bt, a_ptr.dtype.element_ty, UPCAST), acc, IEEE, UPCAST)
    return acc


@triton.jit
def _last_to_arrive(counter_ptr, arrivals):
    """True in the last of ``arrivals`` programs that call this on one counter (which it then resets to 0).

    Every program stored its partial before: the barrier orders its threads' stores
    before the atomic, whose acquire-release makes them visible to the last program,
    which reads the partials through L2 (``.cg``), never a stale L1 line.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _store_rank_padded(
    ROWS: tl.constexpr, base_ptr, cs, c_mask, stride_c, stride_r, value, R_MAX, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    """Stores ``value`` [ROWS, BLOCK_R] at slots [0, BLOCK_R) and zeros at slots [BLOCK_R, R_MAX) of a full-size gradient."""
    rr = tl.arange(0, BLOCK_R)
    tl.store(base_ptr + cs[:, None] * stride_c + rr[None, :] * stride_r, _cast(value, base_ptr.dtype.element_ty, UPCAST),
             mask=c_mask[:, None] & (rr < R_MAX)[None, :])
    zeros = tl.zeros([ROWS, BLOCK_R], dtype=base_ptr.dtype.element_ty)
    for r0 in range(BLOCK_R, R_MAX, BLOCK_R):
        rz = r0 + rr
        tl.store(base_ptr + cs[:, None] * stride_c + rz[None, :] * stride_r, zeros,
                 mask=c_mask[:, None] & (rz < R_MAX)[None, :])


# Ints that change at run time (N, the rank, tile counts, split counts, and strides
# that follow the rank when a caller passes P[:, :r] or a contiguous [out, r] P)
# are not specialised: Triton would otherwise recompile when one of them becomes 1
# or changes its divisibility by 16. Layer sizes and strides that do not move keep
# their specialisation (alignment of the big loads).
@triton.jit(do_not_specialize=["N", "R", "stride_po", "TILES_PER_PROG"])
def _fwd_kernel(
    x_ptr, q_ptr, lam_ptr, act_ptr, p_ptr, base_ptr, y_ptr, xq_ptr,
    N, IN, OUT, R,
    stride_xn, stride_qr, stride_qk, stride_lam, stride_act, stride_po, stride_pr, stride_basen, stride_yn,
    scale,
    TILES_PER_PROG,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, STORE_XQ: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R

    # xq = x Qᵀ for this row tile, fp32 in registers
    acc = _rows_times_rank_matrix(
        x_ptr, stride_xn, rows, row_mask, q_ptr, stride_qk, stride_qr, rr, r_mask, IN,
        BLOCK_M, BLOCK_K, BLOCK_R, IEEE, UPCAST,
    )
    if STORE_XQ:
        if pid_s == 0:
            tl.store(xq_ptr + rows[:, None] * R + rr[None, :], acc, mask=row_mask[:, None] & r_mask[None, :])

    compute = x_ptr.dtype.element_ty
    lam = _cast(tl.load(lam_ptr + rr * stride_lam, mask=r_mask, other=0.0), compute, UPCAST).to(tl.float32)
    act = tl.load(act_ptr + rr * stride_act, mask=r_mask, other=0).to(tl.float32)
    t = _cast((acc * (lam * act)[None, :]) * scale, compute, UPCAST)  # the reference's order: (xq·λ_eff)·s

    for j in range(0, TILES_PER_PROG):
        os = (pid_s * TILES_PER_PROG + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_mask = os < OUT
        pt = tl.load(p_ptr + os[None, :] * stride_po + rr[:, None] * stride_pr, mask=r_mask[:, None] & o_mask[None, :], other=0.0)
        upd = _dot(t, _cast(pt, compute, UPCAST), None, IEEE, UPCAST)
        m = row_mask[:, None] & o_mask[None, :]
        upd += tl.load(base_ptr + rows[:, None] * stride_basen + os[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_yn + os[None, :], _cast(upd, y_ptr.dtype.element_ty, UPCAST), mask=m)


@triton.jit(do_not_specialize=["N", "R", "R_MAX", "M_TILES", "stride_po", "TILES_PER_PROG"])
def _bwd_dx_kernel(
    g_ptr, p_ptr, q_ptr, lam_ptr, act_ptr, xq_ptr, u_ptr, dlam_part_ptr, counter_ptr, dlam_ptr, dx_ptr,
    N, IN, OUT, R, R_MAX, M_TILES,
    stride_gn, stride_po, stride_pr, stride_qr, stride_qk, stride_lam, stride_act, stride_dxn,
    scale,
    TILES_PER_PROG,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, WRITE_DX: tl.constexpr, ACCUM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R

    # gp = g P, once per row tile
    gp = _rows_times_rank_matrix(
        g_ptr, stride_gn, rows, row_mask, p_ptr, stride_po, stride_pr, rr, r_mask, OUT,
        BLOCK_M, BLOCK_N, BLOCK_R, IEEE, UPCAST,
    )

    compute = g_ptr.dtype.element_ty
    lam = _cast(tl.load(lam_ptr + rr * stride_lam, mask=r_mask, other=0.0), compute, UPCAST).to(tl.float32)
    act = tl.load(act_ptr + rr * stride_act, mask=r_mask, other=0).to(tl.float32)
    dz = gp * scale  # ∂L/∂(xq ⊙ λ_eff)
    u = dz * (lam * act)[None, :]  # ∂L/∂xq
    if pid_s == 0:
        m2 = row_mask[:, None] & r_mask[None, :]
        xq = tl.load(xq_ptr + rows[:, None] * R + rr[None, :], mask=m2, other=0.0)
        tl.store(dlam_part_ptr + pid_m * BLOCK_R + rr, tl.sum(dz * xq, axis=0))
        tl.store(u_ptr + rows[:, None] * R + rr[None, :], u, mask=m2)
        if _last_to_arrive(counter_ptr, M_TILES):  # dλ = active ⊙ Σ over row tiles, in a fixed order
            dlam = tl.zeros([BLOCK_R], dtype=tl.float32)
            for m in range(0, M_TILES):
                dlam += tl.load(dlam_part_ptr + m * BLOCK_R + rr, cache_modifier=".cg")
            zero = tl.zeros([1], dtype=tl.int32)
            _store_rank_padded(1, dlam_ptr, zero, zero == 0, 0, stride_lam, (dlam * act)[None, :], R_MAX, BLOCK_R, UPCAST)

    if WRITE_DX:
        uc = _cast(u, compute, UPCAST)
        for j in range(0, TILES_PER_PROG):
            ks = (pid_s * TILES_PER_PROG + j) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = ks < IN
            qt = tl.load(q_ptr + rr[:, None] * stride_qr + ks[None, :] * stride_qk, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            upd = _dot(uc, _cast(qt, compute, UPCAST), None, IEEE, UPCAST)
            dx_ptrs = dx_ptr + rows[:, None] * stride_dxn + ks[None, :]
            m = row_mask[:, None] & k_mask[None, :]
            if ACCUM:
                upd += tl.load(dx_ptrs, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, _cast(upd, dx_ptr.dtype.element_ty, UPCAST), mask=m)


@triton.jit(do_not_specialize=["N", "R", "R_MAX", "stride_gc", "stride_gr", "ROWS_PER_SPLIT", "SPLITS"])
def _tn_kernel(
    a_ptr, b_ptr, lam_ptr, act_ptr, part_ptr, counter_ptr, grad_ptr,
    N, C, R, R_MAX,
    stride_an, stride_lam, stride_act, stride_gc, stride_gr,
    scale,
    ROWS_PER_SPLIT, SPLITS,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, SCALE_B: tl.constexpr,
):
    """grad[c, r] = Σ_n A[n, c] · B'[n, r] for r < R and 0 for R <= r < R_MAX, in grad's dtype,
    B' = (B ⊙ λ_eff)·s if SCALE_B else B.

    A is [N, C] in the compute dtype with unit column stride, B is [N, R] float32
    contiguous, grad is full-size, addressed through (stride_gc, stride_gr): P's
    gradient [C, R_MAX] or Q's [R_MAX, C]. Program (c, s) reduces split s of N into a
    float32 partial; the last of a column tile's SPLITS programs sums them in order.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    compute = a_ptr.dtype.element_ty
    if SCALE_B:
        lam = _cast(tl.load(lam_ptr + rr * stride_lam, mask=r_mask, other=0.0), compute, UPCAST).to(tl.float32)
        act = tl.load(act_ptr + rr * stride_act, mask=r_mask, other=0).to(tl.float32)
        coef = lam * act
    n_begin = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    n_end = tl.minimum(n_begin + ROWS_PER_SPLIT, N)
    acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < n_end
        at = tl.load(a_ptr + ns[:, None] * stride_an + cs[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + ns[:, None] * R + rr[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if SCALE_B:
            bt = (bt * coef[None, :]) * scale
        acc = _dot(tl.trans(at), _cast(bt, compute, UPCAST), acc, IEEE, UPCAST)
    tile = BLOCK_C * BLOCK_R
    part = part_ptr + pid_c.to(tl.int64) * SPLITS * tile + cs[:, None] % BLOCK_C * BLOCK_R + rr[None, :]
    tl.store(part + pid_s * tile, acc)
    if _last_to_arrive(counter_ptr + pid_c, SPLITS):
        acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
        for s in range(0, SPLITS):
            acc += tl.load(part + s * tile, cache_modifier=".cg")
        _store_rank_padded(BLOCK_C, grad_ptr, cs, c_mask, stride_gc, stride_gr, acc, R_MAX, BLOCK_R, UPCAST)


# --------------------------------------------------------------------------- launch helpers
# (BLOCK_K, BLOCK_N) of the row-tiled kernels and num_stages, widest first: the first that fits
# the GPU's shared memory is taken. (BLOCK_C, BLOCK_N) of _tn likewise.
_ROW_TILES = ((64, 128, 3), (64, 128, 2), (32, 64, 3), (32, 64, 2), (32, 32, 2), (16, 32, 2), (16, 16, 2))
_TN_TILES = ((64, 3), (64, 2), (32, 2), (16, 2))


def _blocks_rows(n: int, br: int, elem: int, shared: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages) of the row-tiled kernels, for ``elem``-byte
    operands on a GPU with ``shared`` bytes of shared memory per block.

    These kernels stream the N×out output (N×in for dx) once: they are
    memory-bound, so on a GPU the row tile is kept small (many programs in
    flight per SM, inner loops software-pipelined) rather than MMA-shaped.
    Their shared memory is at most num_stages staged tiles of the row block
    and of the rank-block-wide Q or P, plus the row tile's rank vector (an upper
    bound of what tests/triton/arch_compile.py measures on every architecture).
    Not tuned on hardware yet: ``benchmarks/gpu.py`` is where to tune them.
    """
    if interpreting():  # few, large programs: the interpreter pays per program and per op
        return max(16, min(64, triton.next_power_of_2(n))), 128, 128, 4, 1
    bm = max(16, min(32 if br <= 64 else 16, triton.next_power_of_2(n)))
    warps = 4 if br <= 64 else 8
    for bk, bn, stages in _ROW_TILES:
        if stages * (bm + br) * max(bk, bn) * elem + bm * br * 4 <= shared:
            return bm, bk, bn, warps, stages
    raise ValueError(f"no adapter kernel configuration fits {shared} bytes of shared memory at rank block {br}")


def _blocks_tn(br: int, elem: int, shared: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_N, num_warps, num_stages) of the split-N reduction kernel ``_tn`` (as ``_blocks_rows``;
    its shared memory is what tests/triton/arch_compile.py measures)."""
    if interpreting():
        return 128, 64, 4, 1
    bc = 64 if br <= 64 else 32
    warps = 4 if br <= 32 else 8
    for bn, stages in _TN_TILES:
        for c in (bc, 16):  # staged A (input dtype) and float32 B tiles, and B in the input dtype for the dot
            if (stages - 1) * bn * (c * elem + br * 4) + bn * br * elem <= shared:
                return c, bn, warps, stages
    raise ValueError(f"no reduction kernel configuration fits {shared} bytes of shared memory at rank block {br}")


def _split(m_tiles: int, inner_tiles: int, device: torch.device) -> tuple[int, int]:
    """(programs per row tile, inner tiles per program).

    With fewer row tiles than SMs (small N: decoding, tiny batches) the inner
    tiles of a row tile are spread over several programs, each recomputing
    its small N×r product, so that the whole GPU streams the output.
    """
    want = max(1, triton.cdiv(num_sms(device), m_tiles))
    split = min(want, inner_tiles)
    per = triton.cdiv(inner_tiles, split)
    return triton.cdiv(inner_tiles, per), per


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _fwd(xa: Tensor, P: Tensor, lam: Tensor, Q: Tensor, active: Tensor, scale: float, r: int, base: Tensor, y: Tensor,
         store_xq: bool) -> Tensor | None:
    """``y = base + s·((xa Qᵀ) ⊙ λ_eff) Pᵀ`` over slots [0, r) (``base`` may be ``y``: in place); returns
    ``xq = xa Qᵀ`` (float32 [N, r]) if asked."""
    _common.check_dtype_supported(xa.device, xa.dtype)
    n, k = xa.shape
    out = P.shape[0]
    br = rank_block(r)
    elem = max(xa.element_size(), P.element_size())  # float32 P and Q (autocast) stage wider tiles
    bm, bk, bn, warps, stages = _blocks_rows(n, br, elem, shared_memory(xa.device))
    m_tiles = triton.cdiv(n, bm)
    split, per = _split(m_tiles, triton.cdiv(out, bn), xa.device)
    xq = _common.empty((n, r), torch.float32, xa.device) if store_xq else y
    _fwd_kernel[(m_tiles, split)](
        xa, Q, lam, active, P, base, y, xq,
        n, k, out, r,
        xa.stride(0), Q.stride(0), Q.stride(1), lam.stride(0), active.stride(0), P.stride(0), P.stride(1),
        base.stride(0), y.stride(0),
        float(scale), per,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br,
        IEEE=_ieee(xa.dtype), UPCAST=_upcast(xa.dtype), STORE_XQ=store_xq,
        num_warps=warps, num_stages=stages, enable_fp_fusion=True,
    )
    return xq if store_xq else None


def _tn(a: Tensor, b: Tensor, lam: Tensor | None, active: Tensor | None, scale: float, like: Tensor, out_t: bool) -> Tensor:
    """``Aᵀ B'`` over slots [0, r) (r = B's width) as the full-size gradient of ``like`` (P [C, r_max], or Q
    [r_max, C] if ``out_t``), zeros in the other slots, in ``like``'s dtype: split-N partials reduced in-kernel."""
    _common.check_dtype_supported(a.device, a.dtype)
    n, c = a.shape
    r = b.shape[1]
    br = rank_block(r)
    bc, bnn, warps, stages = _blocks_tn(br, a.element_size(), shared_memory(a.device))
    c_tiles = triton.cdiv(c, bc)
    n_chunks = triton.cdiv(n, bnn)
    split = max(1, min(triton.cdiv(2 * num_sms(a.device), c_tiles), n_chunks, 64))
    rows_per = triton.cdiv(n_chunks, split) * bnn
    split = triton.cdiv(n, rows_per)
    grad = _common.empty(like.shape, like.dtype, a.device)
    s_gc, s_gr = (grad.stride(1), grad.stride(0)) if out_t else (grad.stride(0), grad.stride(1))
    part = _common.empty((c_tiles, split, bc, br), torch.float32, a.device)
    scale_b = lam is not None
    _tn_kernel[(c_tiles, split)](
        a, b, lam if scale_b else b, active if scale_b else b, part, _common.counters(a.device, c_tiles), grad,
        n, c, r, like.shape[0] if out_t else like.shape[1],
        a.stride(0), lam.stride(0) if scale_b else 0, active.stride(0) if scale_b else 0, s_gc, s_gr,
        float(scale), rows_per, split,
        BLOCK_C=bc, BLOCK_N=bnn, BLOCK_R=br,
        IEEE=_ieee(a.dtype), UPCAST=_upcast(a.dtype), SCALE_B=scale_b,
        num_warps=warps, num_stages=stages, enable_fp_fusion=True,
    )
    return grad


def _bwd_dx(g, P, Q, lam, active, xq, scale, dx: Tensor | None, accum: bool) -> tuple[Tensor, Tensor]:
    """Runs ``_bwd_dx``: returns (u float32 [N, r], full-size dλ in λ's dtype); adds/writes ``u Q`` into ``dx``."""
    _common.check_dtype_supported(g.device, g.dtype)
    n, out = g.shape
    k = Q.shape[1]
    r = xq.shape[1]
    br = rank_block(r)
    elem = max(g.element_size(), P.element_size())
    bm, bk, bn, warps, stages = _blocks_rows(n, br, elem, shared_memory(g.device))
    m_tiles = triton.cdiv(n, bm)
    split, per = _split(m_tiles, triton.cdiv(k, bk), g.device) if dx is not None else (1, 0)
    u = _common.empty((n, r), torch.float32, g.device)
    dlam_part = _common.empty((m_tiles, br), torch.float32, g.device)
    dlam = _common.empty(lam.shape, lam.dtype, g.device)
    _bwd_dx_kernel[(m_tiles, split)](
        g, P, Q, lam, active, xq, u, dlam_part, _common.counters(g.device, 1), dlam, dx if dx is not None else u,
        n, k, out, r, lam.shape[0], m_tiles,
        g.stride(0), P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), lam.stride(0), active.stride(0),
        dx.stride(0) if dx is not None else 0,
        float(scale), per,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br,
        IEEE=_ieee(g.dtype), UPCAST=_upcast(g.dtype), WRITE_DX=dx is not None, ACCUM=accum,
        num_warps=warps, num_stages=stages, enable_fp_fusion=True,
    )
    return u, dlam


# --------------------------------------------------------------------------- registered ops
# The launches live in two torch.library custom ops with fake (shape-only)
# implementations: torch.compile traces a model through them with
# fullgraph=True and runs them as opaque calls. Each runs under the launch
# guard of its tensors' device (Triton launches on the current device).
def _none_if_empty(t: Tensor) -> Tensor | None:
    return t if t.numel() else None


@torch.library.custom_op("elalora::triton_adapter_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, xd: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], y0: Optional[Tensor],
    P: Tensor, lam: Tensor, Q: Tensor, active: Tensor, scale: float, r: int, store_xq: bool,
) -> tuple[Tensor, Tensor]:
    """(y = x W0ᵀ + bias + adapter over slots [0, r), xq = xₐ Qᵀ float32 [N, r] or an empty tensor unless ``store_xq``).

    Adapter-only (``weight`` None): the base output is ``y0`` (row-contiguous), which the kernel reads and adds
    to into a new ``y`` of its dtype.
    """
    xa = x if xd is None else xd
    with _common.launch_guard(x.device):
        if weight is None:
            base = y0
            y = _common.empty(y0.shape, y0.dtype, y0.device)
        else:
            base = y = F.linear(x, weight, bias).contiguous()
        xq = _common.run_or_fall_back(
            _key(x, r), lambda: _fwd(xa, P, lam, Q, active, scale, r, base, y, store_xq),
            lambda: _fwd_torch(xa, P, lam, Q, active, scale, r, base, y, store_xq),
        )
    return y, xq if xq is not None else x.new_empty(0, dtype=torch.float32)


def _key(x: Tensor, r: int) -> tuple:
    """What a compile or launch failure is remembered by: the op, its dtype and rank block."""
    return ("adapter_linear", x.dtype, rank_block(r))


def _fwd_torch(xa, P, lam, Q, active, scale, r, base, y, store_xq) -> Tensor | None:
    """``_fwd`` in torch ops (the fallback), fp32 accumulation like the kernel."""
    P, lam, Q, active = _slots(P, lam, Q, active, r, xa.dtype)
    xq = xa.float() @ Q.t()
    torch.add(base, (((xq * (lam * active)) * scale) @ P.t()).to(y.dtype), out=y)
    return xq if store_xq else None


def _slots(P, lam, Q, active, r, dtype):
    """Slots [0, r) of the parameters, rounded to the compute dtype as the kernels read them, in float32."""
    return (*(t.to(dtype).float() for t in (P[:, :r], lam[:r], Q[:r])), active[:r].float())


@_fwd_op.register_fake
def _(x, xd, weight, bias, y0, P, lam, Q, active, scale, r, store_xq):
    xq_shape = (x.shape[0], r) if store_xq else (0,)
    y = x.new_empty(x.shape[0], weight.shape[0]) if weight is not None else y0.new_empty(y0.shape)
    return y, x.new_empty(xq_shape, dtype=torch.float32)


@torch.library.custom_op("elalora::triton_adapter_bwd", mutates_args=())
def _bwd_op(
    g: Tensor, x: Tensor, xd: Optional[Tensor], weight: Optional[Tensor], P: Tensor, lam: Tensor, Q: Tensor,
    active: Tensor, xq: Tensor, scale: float, need_x: bool, need_xd: bool, need_p: bool, need_lam: bool, need_q: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dxd, dP, dλ, dQ), each an empty tensor where not needed; dP, dλ, dQ full-size (slots [0, r), r = xq's width).

    Adapter-only (``weight`` None, and then ``xd`` None): dx is the adapter's part alone, written, not added.
    """
    args = (g, x, xd, weight, P, lam, Q, active, xq, scale, need_x, need_xd, need_p, need_lam, need_q)
    with _common.launch_guard(g.device):
        grads = _common.run_or_fall_back(_key(g, xq.shape[1]), lambda: _bwd(*args), lambda: _bwd_torch(*args))
    return tuple(t if t is not None else g.new_empty(0) for t in grads)  # outputs must not alias


def _bwd(g, x, xd, weight, P, lam, Q, active, xq, scale, need_x, need_xd, need_p, need_lam, need_q):
    dx = dxd = dP = dlam = dQ = None
    if need_x:  # cuBLAS; the adapter part is added in place below (or written, with no base GEMM)
        dx = g @ weight if weight is not None else _common.empty(x.shape, x.dtype, x.device)
    if need_p:
        dP = _tn(g, xq, lam, active, scale, P, out_t=False)
    if need_xd or need_lam or need_q or (need_x and xd is None):
        if xd is None:
            target, accum = (dx, weight is not None) if need_x else (None, False)
        else:
            dxd = _common.empty(xd.shape, xd.dtype, xd.device) if need_xd else None
            target, accum = dxd, False
        u, dl = _bwd_dx(g, P, Q, lam, active, xq, scale, target, accum)
        dlam = dl if need_lam else None
        if need_q:
            dQ = _tn(x if xd is None else xd, u, None, None, 1.0, Q, out_t=True)
    return dx, dxd, dP, dlam, dQ


def _bwd_torch(g, x, xd, weight, P, lam, Q, active, xq, scale, need_x, need_xd, need_p, need_lam, need_q):
    """``_bwd`` in torch ops (the fallback), fp32 accumulation like the kernels."""
    r = xq.shape[1]
    Pr, lamr, Qr, act = _slots(P, lam, Q, active, r, g.dtype)
    coef = lamr * act
    dz = (g.float() @ Pr) * scale  # ∂L/∂(xq ⊙ λ_eff)
    u = dz * coef  # ∂L/∂xq
    dx = None
    if need_x:
        dx = g @ weight if weight is not None else torch.zeros_like(x)
    if need_x and xd is None:
        dx += (u @ Qr).to(dx.dtype)
    dxd = (u @ Qr).to(xd.dtype) if need_xd else None
    dP = _full_size(P, g.float().t() @ (xq * coef * scale), 1) if need_p else None
    dlam = _full_size(lam, (dz * xq).sum(0) * act, 0) if need_lam else None
    dQ = _full_size(Q, u.t() @ (x if xd is None else xd).float(), 0) if need_q else None
    return dx, dxd, dP, dlam, dQ


def _full_size(like: Tensor, slots: Tensor, dim: int) -> Tensor:
    """A gradient of ``like``'s shape and dtype: ``slots`` in the first slots along the rank dimension ``dim``, zeros after."""
    grad = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    grad.narrow(dim, 0, slots.shape[dim]).copy_(slots)
    return grad


@_bwd_op.register_fake
def _(g, x, xd, weight, P, lam, Q, active, xq, scale, need_x, need_xd, need_p, need_lam, need_q):
    def like(flag, t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if flag else g.new_empty(0)

    return like(need_x, x), like(need_xd, xd), like(need_p, P), like(need_lam, lam), like(need_q, Q)


class AdapterLinearFunction(torch.autograd.Function):
    """Base GEMM (cuBLAS) + fused adapter over slots [0, r); inputs are 2-D. ``xd`` is dropout(x) or None.

    With ``weight`` None the base output is ``y0``, computed elsewhere (a quantized base, whose own backward
    gives x its part of the gradient through ``∂L/∂y0 = g``); ``xd`` is then None (x is the adapter's input).
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, P, lam, Q, active, scale, r, y0=None):
        y, xq = _fwd_op(x, xd, weight, bias, y0, P, lam, Q, active, scale, r, True)
        ctx.save_for_backward(x, xd, weight, P, lam, Q, active, xq)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, xd, weight, P, lam, Q, active, xq = ctx.saved_tensors
        need_x, need_xd, need_w, need_b, need_p, need_lam, need_q = ctx.needs_input_grad[:7]
        g = g.contiguous()
        grads = _bwd_op(g, x, xd, weight, P, lam, Q, active, xq, ctx.scale, need_x, need_xd, need_p, need_lam, need_q)
        dx, dxd, dP, dlam, dQ = (_none_if_empty(t) for t in grads)
        dw = g.t() @ x if need_w else None
        db = g.sum(0) if need_b else None
        dy0 = g if ctx.needs_input_grad[10] else None
        return dx, dxd, dw, db, dP, dlam, dQ, None, None, None, dy0


# --------------------------------------------------------------------------- public op
# The dispatch layer may hand P, λ and Q over in their own dtype (float32 under autocast):
# the kernels read them so and cast inside, saving a launch per parameter and its backward.
READS_PARAMETERS_IN_ANY_DTYPE = True


def adapter_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    active: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    rank: int | None = None,
) -> Tensor:
    """``reference.adapter_linear`` with the Triton adapter kernels (same signature, same dropout draw).

    Computes in x's dtype; P, λ and Q may be in another (they are cast inside the kernels)
    and their gradients come back in it, full-size.
    """
    check_device(x, weight, bias, P, lam, Q, active)
    return _adapter(x, weight, bias, None, P, lam, Q, active, scale, dropout_p, rank)


def adapter_add(y0: Tensor, x: Tensor, P: Tensor, lam: Tensor, Q: Tensor, active: Tensor, scale: float,
                dropout_p: float = 0.0, rank: int | None = None) -> Tensor:
    """``reference.adapter_add`` with the Triton adapter kernels: ``y0`` (a quantized base's output) plus the
    adapter, in y0's dtype, with no N×out temporary; ``rank`` and the parameters' dtype as in :func:`adapter_linear`.

    The backward gives x the adapter's part of its gradient only (no base GEMM): the base's own backward adds
    its part through ``∂L/∂y0``.
    """
    check_device(y0, x, P, lam, Q, active)
    return _adapter(x, None, None, y0, P, lam, Q, active, scale, dropout_p, rank)


def _rows(t: Tensor | None) -> Tensor | None:
    """``t`` as a 2-D [rows, features] tensor with unit feature stride, as the kernels read it."""
    if t is None:
        return None
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _adapter(x, weight, bias, y0, P, lam, Q, active, scale, dropout_p, rank) -> Tensor:
    """``adapter_linear`` (``weight`` given) or ``adapter_add`` (``y0`` given)."""
    check_rank(P.shape[1])
    r = P.shape[1] if rank is None else int(rank)
    xd = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None  # first, as the reference does
    if weight is None and xd is not None:  # no base GEMM reads x: dropout's own backward takes x's gradient
        x, xd = xd, None
    lead = x.shape[:-1]
    out_features = P.shape[0]
    if x.numel() == 0 or r == 0:  # nothing to fuse
        P, lam, Q, active = P[:, :r].to(x.dtype), lam[:r].to(x.dtype), Q[:r].to(x.dtype), active[:r]
        base = F.linear(x, weight, bias) if weight is not None else y0
        return base + scale * (((x if xd is None else xd) @ Q.t()) * (lam * active.to(lam.dtype))) @ P.t()
    x2, xd2, y02 = _rows(x), _rows(xd), _rows(y0)
    tensors = (x2, xd2, weight, bias, y02, P, lam, Q)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y = AdapterLinearFunction.apply(x2, xd2, weight, bias, P, lam, Q, active, float(scale), r, y02)
    else:
        y, _ = _fwd_op(x2, xd2, weight, bias, y02, P, lam, Q, active, float(scale), r, False)
    return y.reshape(*lead, out_features)
