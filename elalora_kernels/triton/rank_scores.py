"""docs/ALGORITHM.md §3 — importance of every rank of every matrix, in one launch.

    S[m, j] = Ī(λ_j)·Ū(λ_j) + ( mean_i Ī(Q[j,i])·Ū(Q[j,i]) + mean_o Ī(P[o,j])·Ū(P[o,j]) )

A pointer table holds the six EMA tensors and the (out, in) sizes of each
matrix; program m reduces the rows of Q and the columns of P of matrix m with
fp32 accumulation and writes row m of the float32 [M, r_max] result. The two
means are added first, as the reference does. Runs once per reallocation
round, so the table is rebuilt per call.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from elalora_kernels import reference

from . import _common
from ._common import check_device, interpreting, rank_block


@triton.jit
def _rank_scores_kernel(
    table,  # int64 [M, 8]: ip, up, il, ul, iq, uq addresses, out, in
    out_ptr,  # float32 [M, R]
    R,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    m = tl.program_id(0)
    row = table + 8 * m
    ip = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    up = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    il = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    ul = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    iq = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    uq = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    n_out = tl.load(row + 6)
    n_in = tl.load(row + 7)
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R

    q_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):  # Q is [R, in]: reduce along in
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = r_mask[:, None] & (ks < n_in)[None, :]
        offs = rr[:, None] * n_in + ks[None, :]
        a = tl.load(iq + offs, mask=mask, other=0.0)
        b = tl.load(uq + offs, mask=mask, other=0.0)
        q_sum += tl.sum(a * b, axis=1)

    p_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for o0 in range(0, n_out, BLOCK_O):  # P is [out, R]: reduce along out
        os = o0 + tl.arange(0, BLOCK_O)
        mask = (os < n_out)[:, None] & r_mask[None, :]
        offs = os[:, None] * R + rr[None, :]
        a = tl.load(ip + offs, mask=mask, other=0.0)
        b = tl.load(up + offs, mask=mask, other=0.0)
        p_sum += tl.sum(a * b, axis=0)

    lam_score = tl.load(il + rr, mask=r_mask, other=0.0) * tl.load(ul + rr, mask=r_mask, other=0.0)
    score = lam_score + (q_sum / n_in.to(tl.float32) + p_sum / n_out.to(tl.float32))
    tl.store(out_ptr + m * R + rr, score, mask=r_mask)


def _f32(t: Tensor) -> Tensor:
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    return t.contiguous()


def rank_scores(
    ipt: Sequence[tuple[Tensor, Tensor, Tensor]],
    unc: Sequence[tuple[Tensor, Tensor, Tensor]],
) -> Tensor:
    """``reference.rank_scores`` for all M matrices in one launch: float32 [M, r_max]."""
    if len(ipt) != len(unc):
        raise ValueError("rank_scores: ipt and unc must have one entry per matrix")
    if len(ipt) == 0:
        raise ValueError("rank_scores: no matrices")
    r = ipt[0][1].shape[0]
    keep: list[Tensor] = []  # keeps any converted copy alive until the kernel has run
    addrs: list[int] = []
    for (ip, il, iq), (up, ul, uq) in zip(ipt, unc):
        check_device(ip, il, iq, up, ul, uq)
        n_out, n_in = ip.shape[0], iq.shape[1]
        if not (ip.shape == up.shape == (n_out, r) and il.shape == ul.shape == (r,) and iq.shape == uq.shape == (r, n_in)):
            raise ValueError(f"rank_scores: every matrix must have P [out, {r}], λ [{r}], Q [{r}, in] EMAs")
        ts = [_f32(t) for t in (ip, up, il, ul, iq, uq)]
        keep += ts
        addrs += [t.data_ptr() for t in ts] + [n_out, n_in]
    device = ipt[0][1].device
    out = _common.empty((len(ipt), r), torch.float32, device)
    if r == 0:
        return out
    br = rank_block(r)

    def launch():
        table = torch.tensor(addrs, dtype=torch.int64).to(device)
        tile = 256 if interpreting() else max(16, min(256, 8192 // br))  # ~8K fp32 per tile on a GPU
        _rank_scores_kernel[(len(ipt),)](
            table, out, r,
            BLOCK_R=br,
            BLOCK_K=tile,
            BLOCK_O=tile,
            num_warps=4,
            enable_fp_fusion=False,
        )
        return out

    with _common.launch_guard(device):
        out = _common.run_or_fall_back(("rank_scores", br), launch, lambda: reference.rank_scores(ipt, unc).float())
    del keep
    return out
