"""docs/ALGORITHM.md §1 as one autograd op with a hand-written backward.

    y = x W0ᵀ + bias + s·((dropout(x) Qᵀ) ⊙ (λ·active)) Pᵀ

Written in torch ops only, so it serves any device (it is the CPU backend's
op and the CUDA fallback when Triton is missing). Per call, with N rows, r
slots, c = s·λ·active (r numbers):

forward   h  = xₐ Qᵀ                (N×r, saved)
          y  = bias + x W0ᵀ          (addmm: the base output)
          y += h (P ⊙ c)ᵀ            (addmm_ into y: no N×out temporary)
backward  G  = gᵀ h                  (out×r)
          gh = g (P ⊙ c)             (N×r: g·P, computed once, already scaled)
          dP = G ⊙ c
          dλ = s·active ⊙ Σₒ G ⊙ P   (= s·active ⊙ Σₙ (gP) ⊙ h)
          dQ = ghᵀ xₐ
          dx = g W0 + gh Q           (addmm_ into one buffer; gh Q ⊙ dropout noise first when p > 0)

Five GEMMs in the backward, three in the forward, and no elementwise pass
over an N×r or N×out tensor: every scaling is applied to the r-wide factors.
Riding the rank-r update inside the base GEMMs (K-concatenated operands
[x | u]·[W0 | P]ᵀ and [g | v]·[W0 ; Q]) or running row blocks while they are
in cache was measured against this arrangement on CPU and did not beat it
(benchmarks/bench_cpu_adapter_arrangements.py, benchmarks/RESULTS.md).

xₐ is x, or dropout(x) drawn exactly as ``F.dropout(x, p, training=True)``
draws it (same RNG stream, same mask for one seed) as the first random op.

Autocast is handled once for every backend by :mod:`elalora_kernels.dispatch`,
which casts the operands to the autocast dtype and calls this op with
autocast off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class AdapterLinearFunction(torch.autograd.Function):
    """With ``weight = None`` the base output is ``y0``, computed elsewhere (a quantized base), and the
    adapter's ``addmm`` writes ``y0 + h (P ⊙ c)ᵀ`` into a new tensor; ``∂L/∂y0 = g``."""

    @staticmethod
    def forward(ctx, x, weight, bias, P, lam, Q, active, scale, dropout_p, y0=None):
        in_features, out_features = Q.shape[1], P.shape[0]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        if dropout_p > 0:
            # F.dropout(x) on CPU is x * noise with noise = bernoulli(1-p)/(1-p) drawn on
            # empty_like(x); dropping out a ones_like(x) draws the same noise from the same
            # stream, and keeps it for the backward.
            noise = F.dropout(torch.ones_like(x), dropout_p, training=True)
            xa = (x * noise).reshape(-1, in_features)
            noise = noise.reshape(-1, in_features)
        else:
            noise = None
            xa = x2
        coeff = lam * active.to(lam.dtype) * scale  # [r]: s·λ·active
        Pc = P * coeff  # out×r
        h = torch.mm(xa, Q.t())  # N×r
        if weight is None:
            y = torch.addmm(y0.reshape(-1, out_features), h, Pc.t())
        else:
            y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
            y.addmm_(h, Pc.t())

        ctx.save_for_backward(
            xa if (ctx.needs_input_grad[5] or ctx.needs_input_grad[1]) else None,
            x2 if ctx.needs_input_grad[1] and noise is not None else None,
            noise,
            h,
            weight if ctx.needs_input_grad[0] else None,
            P,
            Pc,
            Q if ctx.needs_input_grad[0] else None,
            coeff,
            active,
        )
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.y0_needs_grad = y0 is not None and y0.requires_grad
        return y.view(*lead, out_features)

    @staticmethod
    def backward(ctx, grad):
        xa, x_raw, noise, h, weight, P, Pc, Q, coeff, active = ctx.saved_tensors
        need_x, need_w, need_b, need_p, need_lam, need_q = ctx.needs_input_grad[:6]
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = gp = glam = gq = None

        if need_p or need_lam:
            G = torch.mm(g.t(), h)  # out×r
            if need_p:
                gp = G * coeff
            if need_lam:
                glam = (G * P).sum(0).mul_(ctx.scale).mul_(active.to(G.dtype))
        if need_q or need_x:
            gh = torch.mm(g, Pc)  # N×r: ∂L/∂h
            if need_q:
                gq = torch.mm(gh.t(), xa)
            if need_x:
                if weight is None:
                    gx = torch.mm(gh, Q) if noise is None else torch.mm(gh, Q).mul_(noise)
                else:
                    gx = torch.mm(g, weight)
                    if noise is None:
                        gx.addmm_(gh, Q)
                    else:
                        gx.add_(torch.mm(gh, Q).mul_(noise))
                gx = gx.view(ctx.x_shape)
        if need_w:  # only when someone unfroze W0
            gw = torch.mm(g.t(), x_raw if x_raw is not None else xa)
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        gy0 = grad if ctx.y0_needs_grad else None  # None too when y0 was not passed (one grad too many is allowed)
        return gx, gw, gb, gp, glam, gq, None, None, None, gy0


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
    """Same signature and meaning as :func:`elalora_kernels.reference.adapter_linear`."""
    if rank is not None:  # autograd's slices: on CPU a zero fill of the full-size gradient costs ~nothing
        P, lam, Q, active = P[:, :rank], lam[:rank], Q[:rank], active[:rank]
    return AdapterLinearFunction.apply(x, weight, bias, P, lam, Q, active, float(scale), float(dropout_p))


def adapter_add(y0, x, P, lam, Q, active, scale, dropout_p=0.0) -> Tensor:
    """Same signature and meaning as :func:`elalora_kernels.reference.adapter_add`."""
    return AdapterLinearFunction.apply(x, None, None, P, lam, Q, active, float(scale), float(dropout_p), y0)
