"""Issue 14's question: does another arrangement of the adapter GEMMs beat the CPU op's
present one (3 GEMMs forward, 5 backward, elalora_kernels/torch_ops/adapter_linear.py)?

* present      y = x W0ᵀ + b;  y += h (P⊙c)ᵀ with h = x Qᵀ;  dx = g W0;  dx += (g (P⊙c)) Q
* K-concat     the rank-r update rides inside the base GEMMs:
               y = [x | u]·[W0 | P]ᵀ + b with u = (x Qᵀ)⊙c;   dx = [g | v]·[W0 ; Q] with v = (g P)⊙c
               (pays a copy of x, g and W0 into the concatenated operands every call)
* row-blocked  x and g in blocks of rows; each block's base and adapter GEMMs run back to back,
               while the block is still in cache (saves passes over x, y, g, dx; pays more, smaller calls)

with c = s·λ·active. Forward+backward of one layer as in bench_cpu_adapter.py (x requires grad, frozen base
with bias, float32, no dropout, r active slots), ratios over the frozen nn.Linear alone, all
contenders interleaved.

    python benchmarks/bench_cpu_adapter_arrangements.py [--threads 2] [--rounds 9]
    pytest benchmarks/bench_cpu_adapter_arrangements.py   # the arrangements against the reference
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import cpu_cases as C  # noqa: E402
from elalora_kernels import reference  # noqa: E402
from elalora_kernels.torch_ops.adapter_linear import AdapterLinearFunction  # noqa: E402


def _coeff(lam, active, scale):
    return lam * active.to(lam.dtype) * scale


def _grad_lam(G, P, active, scale):
    return (G * P).sum(0).mul_(scale).mul_(active.to(G.dtype))


class KConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, P, lam, Q, active, scale):
        d = x.shape[1]
        c = _coeff(lam, active, scale)
        xu = torch.empty(x.shape[0], d + Q.shape[0], dtype=x.dtype)
        xu[:, :d] = x
        h = torch.mm(x, Q.t())
        torch.mul(h, c, out=xu[:, d:])
        y = torch.addmm(b, xu, torch.cat([W, P], 1).t())
        ctx.save_for_backward(x, h, W, P, Q, active, c)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, W, P, Q, active, c = ctx.saved_tensors
        out = g.shape[1]
        G = torch.mm(g.t(), h)
        gv = torch.empty(g.shape[0], out + Q.shape[0], dtype=g.dtype)
        gv[:, :out] = g
        v = torch.mm(g, P * c, out=gv[:, out:])
        gx = torch.mm(gv, torch.cat([W, Q], 0))
        return gx, None, None, G * c, _grad_lam(G, P, active, ctx.scale), torch.mm(v.t(), x), None, None


class RowBlocked(torch.autograd.Function):
    ROWS = 256

    @staticmethod
    def forward(ctx, x, W, b, P, lam, Q, active, scale):
        c = _coeff(lam, active, scale)
        Pc = P * c
        y = torch.empty(x.shape[0], W.shape[0], dtype=x.dtype)
        h = torch.empty(x.shape[0], Q.shape[0], dtype=x.dtype)
        for i in range(0, x.shape[0], RowBlocked.ROWS):
            rows = slice(i, i + RowBlocked.ROWS)
            yb = torch.addmm(b, x[rows], W.t(), out=y[rows])
            yb.addmm_(torch.mm(x[rows], Q.t(), out=h[rows]), Pc.t())
        ctx.save_for_backward(x, h, W, P, Pc, Q, active, c)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, W, P, Pc, Q, active, c = ctx.saved_tensors
        G = torch.zeros(W.shape[0], Q.shape[0], dtype=g.dtype)
        gq = torch.zeros_like(Q)
        gx = torch.empty_like(x)
        for i in range(0, x.shape[0], RowBlocked.ROWS):
            rows = slice(i, i + RowBlocked.ROWS)
            gh = torch.mm(g[rows], Pc)
            G.addmm_(g[rows].t(), h[rows])
            torch.mm(g[rows], W, out=gx[rows]).addmm_(gh, Q)
            gq.addmm_(gh.t(), x[rows])
        return gx, None, None, G * c, _grad_lam(G, P, active, ctx.scale), gq, None, None


ARRANGEMENTS = {"present": AdapterLinearFunction, "K-concat": KConcat, "row-blocked": RowBlocked}


def _apply(name, x, W, b, P, lam, Q, active, scale):
    if name == "present":
        return AdapterLinearFunction.apply(x, W, b, P, lam, Q, active, scale, 0.0)
    return ARRANGEMENTS[name].apply(x, W, b, P, lam, Q, active, scale)


def _layer(n, d, r, seed=0):
    """x, upstream gradient, frozen base and adapter factors with r_max = 2r slots, r active."""
    gen = torch.Generator().manual_seed(seed)
    base = C._base_linear(d, seed)
    x = torch.randn(n, d, generator=gen).requires_grad_(True)
    g = torch.randn(n, d, generator=gen)
    P = (torch.randn(d, r, generator=gen) * 0.1).requires_grad_(True)
    lam = torch.randn(r, generator=gen).requires_grad_(True)
    Q = (torch.randn(r, d, generator=gen) * 0.1).requires_grad_(True)
    return x, g, base, P, lam, Q, torch.ones(r, dtype=torch.bool)


@pytest.mark.parametrize("name", [n for n in ARRANGEMENTS if n != "present"])
@pytest.mark.parametrize("n,d_in,d_out,r", [(1, 7, 5, 1), (7, 123, 33, 3), (123, 64, 7, 4)])
def test_arrangement_matches_reference(name, n, d_in, d_out, r):
    gen = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, W, b, P, lam, Q, g = t(n, d_in), t(d_out, d_in), t(d_out), t(d_out, r), t(r), t(r, d_in), t(n, d_out)
    active = torch.arange(r) % 2 == 0  # gaps in the mask
    leaves = [v.requires_grad_(True) for v in (x, P, lam, Q)]
    ours = _apply(name, x, W, b, P, lam, Q, active, 1.5)
    ref = reference.adapter_linear(x, W, b, P, lam, Q, active, 1.5)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def measure(n, d, r, rounds):
    x, g, base, P, lam, Q, active = _layer(n, d, r)
    leaves = [x, P, lam, Q]

    def step(forward):
        def run():
            for t in leaves:
                t.grad = None
            forward().backward(g)

        return run

    fns = {"base": step(lambda: base(x))}
    for name in ARRANGEMENTS:
        fns[name] = step(lambda name=name: _apply(name, x, base.weight, base.bias, P, lam, Q, active, 2.0))
    fns["PEFT LoRA"] = C.adapter_case("peft LoRA", n, d, r)
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            times[k].append(C.timed(fns[k]))
    ratios = {k: statistics.median([t / b for t, b in zip(times[k], times["base"])]) for k in names[1:]}
    return statistics.median(times["base"]), ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cols = list(ARRANGEMENTS) + ["PEFT LoRA"]
    print(f"threads {args.threads}, rounds {args.rounds}, started {time.strftime('%H:%M')}")
    print("| N | d | r | base | " + " | ".join(f"{c} / base" for c in cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for n, d, r in C.ADAPTER_SHAPES:
        base_s, ratios = measure(n, d, r, args.rounds)
        print(f"| {n} | {d} | {r} | {base_s * 1e3:.1f} ms | " + " | ".join(f"{ratios[c]:.3f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
