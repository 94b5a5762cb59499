"""Batched rank scores and orthogonality penalty (elalora_kernels.torch_ops.batched) against the reference."""
from __future__ import annotations

import pytest
import torch

import elalora_kernels
from elalora_kernels import cpu, reference
from elalora_kernels.torch_ops import batched

# (out, in) of the matrices of one model, r_max shared: several shapes, repeated, interleaved.
MIXED = [(17, 5), (300, 123), (17, 5), (5, 300), (300, 123), (17, 5), (1, 1)]


def _emas(shapes, r, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def triple(o, i):
        return [
            (torch.rand(o, r, generator=gen) ** 3).to(dtype),
            (torch.rand(r, generator=gen) ** 3).to(dtype),
            (torch.rand(r, i, generator=gen) ** 3).to(dtype),
        ]

    return [tuple(triple(o, i)) for o, i in shapes], [tuple(triple(o, i)) for o, i in shapes]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shapes,r", [(MIXED, 7), ([(384, 384)] * 6 + [(1536, 384), (384, 1536)] * 2, 16), ([(9, 4)], 3)])
def test_rank_scores_bit_identical(shapes, r, threads):
    torch.set_num_threads(threads)
    ipt, unc = _emas(shapes, r)
    ours = batched.rank_scores(ipt, unc)
    assert ours.dtype == torch.float32 and ours.shape == (len(shapes), r)
    assert torch.equal(ours, reference.rank_scores(ipt, unc))


def test_rank_scores_of_views_into_flat_buffers():
    """As the allocator calls it: every EMA a view into one flat float32 buffer."""
    r = 6
    sizes = [(o * r, r, r * i) for o, i in MIXED]
    total = sum(sum(s) for s in sizes)
    flat_i, flat_u = torch.rand(total) ** 2, torch.rand(total) ** 2

    def views(flat):
        out, off = [], 0
        for (o, i), (np_, nl, nq) in zip(MIXED, sizes):
            p = flat[off : off + np_].view(o, r)
            lam = flat[off + np_ : off + np_ + nl]
            q = flat[off + np_ + nl : off + np_ + nl + nq].view(r, i)
            out.append((p, lam, q))
            off += np_ + nl + nq
        return out

    assert torch.equal(batched.rank_scores(views(flat_i), views(flat_u)), reference.rank_scores(views(flat_i), views(flat_u)))


@pytest.mark.parametrize("threads", [1, 2])
def test_rank_scores_write_every_element_bit_identically(threads):
    """Into an output poisoned with NaN: an element left unwritten fails."""
    torch.set_num_threads(threads)
    for shapes, r in [(MIXED, 5), ([(384, 384)] * 6 + [(1536, 384), (384, 1536)] * 2, 16)]:
        ipt, unc = _emas(shapes, r, seed=1)
        out = torch.full((len(shapes), r), float("nan"))
        batched._rank_scores_into(out, ipt, unc)
        assert torch.equal(out, reference.rank_scores(ipt, unc))


def test_rank_scores_argument_errors():
    ipt, unc = _emas(MIXED[:2], 3)
    with pytest.raises(ValueError):
        batched.rank_scores(ipt, unc[:1])
    with pytest.raises(ValueError):
        batched.rank_scores([], [])


def _factors(shapes, r, seed, dtype=torch.float32, ranks=None):
    gen = torch.Generator().manual_seed(seed)
    Ps = [(torch.randn(o, r, generator=gen) * 0.3).to(dtype).requires_grad_(True) for o, i in shapes]
    Qs = [(torch.randn(r, i, generator=gen) * 0.3).to(dtype).requires_grad_(True) for o, i in shapes]
    if ranks is None:
        ranks = torch.randint(1, r + 1, (len(shapes),), generator=gen).tolist()
    actives = [torch.arange(r) < k for k in ranks]
    return Ps, Qs, actives


# dtype -> (rtol, atol) of the penalty and its gradients against the reference in the same dtype.
# The reference and the batched op both compute in float32 after the same cast; they differ
# only in the order of the sums (per matrix vs batched), so a float32-sized tolerance is right.
ORTH_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6), torch.float64: (1e-5, 1e-6)}


@pytest.mark.parametrize("dtype", list(ORTH_TOL))
@pytest.mark.parametrize("shapes,r", [(MIXED, 7), ([(33, 40)], 4), ([(300, 123)] * 3, 1)])
def test_orth_penalty_matches_reference(shapes, r, dtype):
    rtol, atol = ORTH_TOL[dtype]
    Ps, Qs, actives = _factors(shapes, r, seed=2, dtype=dtype)
    ours = batched.orth_penalty(Ps, Qs, actives, 0.1)
    ref = reference.orth_penalty(Ps, Qs, actives, 0.1)
    assert ours.dtype == torch.float32 and ours.shape == ()
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    g_ours = torch.autograd.grad(ours, Ps + Qs)
    g_ref = torch.autograd.grad(ref, Ps + Qs)
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol * 10, atol=atol)


def test_orth_penalty_inactive_slots_are_cut_out():
    """Anything in an inactive slot, even huge values, changes neither the penalty nor gets gradient."""
    shapes, r = [(20, 12), (20, 12), (8, 30)], 5
    Ps, Qs, actives = _factors(shapes, r, seed=3, ranks=[2, 5, 3])
    base = batched.orth_penalty(Ps, Qs, actives, 0.1)
    with torch.no_grad():
        for P, Q, a in zip(Ps, Qs, actives):
            P[:, ~a] = 1e3
            Q[~a] = -1e3
    again = batched.orth_penalty(Ps, Qs, actives, 0.1)
    torch.testing.assert_close(again, base)
    grads = torch.autograd.grad(again, Ps + Qs)
    for P_grad, Q_grad, a in zip(grads[:3], grads[3:], actives):
        assert (P_grad[:, ~a] == 0).all() and (Q_grad[~a] == 0).all()


@elalora_kernels.use_backend("cpu")
def test_cpu_backend_and_dispatch_score_per_matrix():
    assert cpu.rank_scores is reference.rank_scores  # the orthogonality penalty: test_cpu_orth_penalty.py
    ipt, unc = _emas(MIXED, 4, seed=5)
    assert torch.equal(elalora_kernels.rank_scores(ipt, unc), reference.rank_scores(ipt, unc))
