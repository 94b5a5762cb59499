"""The math on FSDP2 shards (elalora_kernels.sharded) against the reference, every process simulated on this one:
tensors split on dim 0 as torch.chunk splits them, the parts summed (the all-reduce) or stacked (the
all-gather). Under the float64-oracle rule of tests/_kernel_oracle.py; the collectives themselves run in
tests/test_reliability_fsdp.py."""
from __future__ import annotations

import pytest
import torch

from elalora_kernels import reference, sharded
from _kernel_oracle import assert_within_eager_error, rounded

WORLDS = [1, 2, 3, 5]
# (out, in) of every matrix: out smaller than some worlds (empty shards), repeated shapes, 1×1.
SHAPES = [(17, 5), (2, 30), (1, 1), (17, 5), (40, 3)]
R_MAX = 7


def _shard(t, world, k):
    lo, hi = sharded.shard_rows(t.shape[0], world, k)
    return t[lo:hi]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", [0, 1, 4, 7, 8, 9])
def test_shard_rows_are_torch_chunk(n, world):
    rows = torch.arange(n)
    chunks = list(torch.chunk(rows, world)) if n else []
    for k in range(world):
        want = chunks[k] if k < len(chunks) else rows[:0]
        assert torch.equal(_shard(rows, world, k), want)


def _emas(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def triple(o, i):
        return tuple(torch.rand(s, generator=gen, dtype=torch.float64) ** 3 for s in ((o, R_MAX), (R_MAX,), (R_MAX, i)))

    return [triple(o, i) for o, i in SHAPES], [triple(o, i) for o, i in SHAPES]


def _sharded_scores(ipt, unc, world):
    total = sum(
        sharded.rank_score_parts([tuple(_shard(t, world, k) for t in m) for m in ipt],
                                 [tuple(_shard(t, world, k) for t in m) for m in unc], world, k)
        for k in range(world)
    )
    return sharded.rank_scores_from_parts(total, [o for o, _ in SHAPES])


@pytest.mark.parametrize("world", WORLDS)
def test_rank_scores_from_shards(world):
    """P's column sums add up over processes in float64; λ and Q terms come whole from the process holding the slot."""
    ipt64, unc64 = _emas()
    ipt, unc = ([tuple(t.float() for t in m) for m in ms] for ms in (ipt64, unc64))
    exact = reference.rank_scores(*([tuple(rounded(t, torch.float32) for t in m) for m in ms] for ms in (ipt, unc)))
    ours = _sharded_scores(ipt, unc, world)
    assert ours.dtype == torch.float32
    assert_within_eager_error([ours], [reference.rank_scores(ipt, unc)], [exact], torch.float32, ["scores"])


def test_rank_scores_without_p_terms_are_the_single_process_bits():
    """Only P's mean is rounded differently on shards: with its EMAs zero, the table is bit-identical."""
    ipt, unc = _emas(seed=1)
    ipt = [(torch.zeros_like(p).float(), lam.float(), q.float()) for p, lam, q in ipt]
    unc = [tuple(t.float() for t in m) for m in unc]
    assert torch.equal(_sharded_scores(ipt, unc, 3), reference.rank_scores(ipt, unc))


def _penalty_and_grads(Ps, Qs, ranks, world, dtype):
    """The penalty from every simulated process's piece, and the whole gradients pieced from each process's."""
    P_shards = [[_shard(P, world, k).to(dtype).requires_grad_(True) for P in Ps] for k in range(world)]
    Q_shards = [[_shard(Q, world, k).to(dtype).requires_grad_(True) for Q in Qs] for k in range(world)]
    pieces = torch.stack([sharded.orth_penalty_piece(P_shards[k], Q_shards[k], ranks, world) for k in range(world)])
    value = sharded.orth_penalty_from_pieces(pieces, ranks, [R_MAX] * len(Ps), [Q.shape[1] for Q in Qs], 0.1)
    grads = iter(torch.autograd.grad(value, [t for shards in P_shards + Q_shards for t in shards]))
    P_grads, Q_grads = ([[next(grads) for _ in shards] for shards in kind] for kind in (P_shards, Q_shards))
    whole = [torch.cat([g[m] for g in P_grads]) for m in range(len(Ps))]
    whole += [torch.cat([g[m] for g in Q_grads]) for m in range(len(Qs))]
    return [value.detach(), *whole]


def _reference_penalty_and_grads(Ps, Qs, ranks, dtype, **kw):
    Ps = [P.to(dtype).requires_grad_(True) for P in Ps]
    Qs = [Q.to(dtype).requires_grad_(True) for Q in Qs]
    actives = [torch.arange(R_MAX) < r for r in ranks]  # a layer's active slots are its first ones
    value = reference.orth_penalty(Ps, Qs, actives, 0.1, **kw)
    return [value.detach(), *torch.autograd.grad(value, Ps + Qs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", WORLDS)
def test_orth_penalty_and_its_gradients_from_shards(world, dtype):
    gen = torch.Generator().manual_seed(world)
    Ps = [torch.randn(o, R_MAX, generator=gen, dtype=torch.float64) * 0.3 for o, _ in SHAPES]
    Qs = [torch.randn(R_MAX, i, generator=gen, dtype=torch.float64) * 0.3 for _, i in SHAPES]
    ranks = [3, R_MAX, 1, 0, 5]
    exact = _reference_penalty_and_grads([rounded(P, dtype) for P in Ps], [rounded(Q, dtype) for Q in Qs], ranks,
                                         torch.float64, compute_dtype=torch.float64)
    eager = _reference_penalty_and_grads(Ps, Qs, ranks, dtype)
    ours = _penalty_and_grads(Ps, Qs, ranks, world, dtype)
    assert ours[0].dtype == torch.float32 and all(g.dtype == dtype for g in ours[1:])
    names = ["value"] + [f"P{m}" for m in range(len(Ps))] + [f"Q{m}" for m in range(len(Qs))]
    assert_within_eager_error(ours, eager, exact, dtype, names)
