"""Property-based tests (hypothesis): plan_round and the allocator driven by
random configs and random score streams (with ties and non-finite gradients)
keep their invariants:

* total rank conserved; every rank within [1, r_max]; at most k ranks lost or
  gained per matrix per round;
* the active mask is the packed prefix [0, rank) and matches the layer's rank;
  inactive slots contribute nothing to the output;
* a new slot starts with λ ≈ 0 (|λ| ≤ 1e-13) and zero EMAs;
* no NaN (nor inf) is ever written to an EMA.
"""
import warnings

import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from elalora import ElaLoRAConfig, ElaLoRALinear, RankAllocator
from elalora.reallocation import plan_round


def fast(n: int):
    return settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, max_examples=n)


# --------------------------------------------------------------- plan_round
@st.composite
def round_inputs(draw):
    r_max = draw(st.integers(1, 8))
    m = draw(st.integers(1, 6))
    ranks = draw(st.lists(st.integers(1, r_max), min_size=m, max_size=m))
    # Few distinct values: ties are common, and the strict order must still decide.
    values = st.sampled_from([0.0, 1e-9, 0.5, 1.0, 2.0]) | st.floats(0, 1e3, allow_nan=False)
    scores = [draw(st.lists(values, min_size=r_max, max_size=r_max)) for _ in range(m)]
    k = draw(st.integers(1, 4))
    b = draw(st.integers(0, 12))
    return scores, ranks, r_max, k, b


@fast(300)
@given(round_inputs())
def test_plan_round_invariants(args):
    scores, ranks, r_max, k, b = args
    plan = plan_round(scores, ranks, r_max, k, b)
    assert plan == plan_round(scores, ranks, r_max, k, b), "not deterministic"
    pool = sum(min(k, r - 1) for r in ranks)
    assert len(plan.prune) == len(plan.expand) == min(b, pool)
    assert len(set(plan.prune)) == len(plan.prune)
    assert all(0 <= j < ranks[m] for m, j in plan.prune)
    lost = [sum(1 for mm, _ in plan.prune if mm == m) for m in range(len(ranks))]
    gained = [plan.expand.count(m) for m in range(len(ranks))]
    new = [r - lo + g for r, lo, g in zip(ranks, lost, gained)]
    assert sum(new) == sum(ranks)
    assert all(1 <= r <= r_max for r in new)
    assert all(lo <= min(k, r - 1) for lo, r in zip(lost, ranks))
    assert all(g <= max(1, min(k, r - 1)) for g, r in zip(gained, ranks))
    # Prune takes the weakest entries of the pool in the strict (score, matrix, slot) order.
    cand = sorted(
        entry for m, r in enumerate(ranks) for entry in sorted((scores[m][j], m, j) for j in range(r))[: min(k, r - 1)]
    )
    assert plan.prune == [(m, j) for _, m, j in cand[:b]]


# ---------------------------------------------------------------- allocator
@st.composite
def allocator_setups(draw):
    r = draw(st.integers(1, 4))
    r_max = draw(st.integers(r, r + 4))
    t_init = draw(st.integers(0, 3))
    t_final = draw(st.integers(0, 3))
    total = t_init + t_final + draw(st.integers(2, 14))
    config = ElaLoRAConfig(
        r=r, r_max=r_max, b=draw(st.integers(0, 6)), k=draw(st.integers(1, 3)),
        t_init=t_init, t_final=t_final, mask_interval=draw(st.integers(1, 3)), total_steps=total,
        rank_scheduler=draw(st.booleans()), beta1=draw(st.sampled_from([0.5, 0.85, 0.99])),
        beta2=draw(st.sampled_from([0.5, 0.85, 0.99])), target_modules=("a", "b", "c"),
        seed=draw(st.integers(0, 2**16)),
    )
    shapes = draw(st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=3, max_size=3))
    stream = dict(
        seed=draw(st.integers(0, 2**16)),
        quantized=draw(st.booleans()),  # gradients from {-1, 0, 1}: many exact ties
        poison=draw(st.sampled_from([0.0, 0.0, 0.05])),  # fraction of inf/nan gradient elements
        with_optimizer=draw(st.booleans()),
    )
    return config, shapes, stream


class Three(nn.Module):
    def __init__(self, shapes, config):
        super().__init__()
        for name, (i, o) in zip(("a", "b", "c"), shapes):
            setattr(self, name, ElaLoRALinear(i, o, r=config.r, r_max=config.r_max,
                                              generator=torch.Generator().manual_seed(config.seed)))


def _check_layers(alloc, config, total):
    ranks = [layer.active_rank for layer in alloc.layers]
    assert sum(ranks) == total, "total rank not conserved"
    for layer in alloc.layers:
        r = layer.active_rank
        assert 1 <= r <= config.r_max
        assert int(layer.active.sum()) == r and bool(layer.active[:r].all()), "mask is not the packed prefix"
    assert not torch.isnan(alloc.ema_ipt).any() and not torch.isnan(alloc.ema_unc).any()
    assert torch.isfinite(alloc.ema_ipt).all() and torch.isfinite(alloc.ema_unc).all()


@fast(60)
@given(allocator_setups())
def test_allocator_invariants_under_random_score_streams(setup):
    config, shapes, stream = setup
    model = Three(shapes, config)
    # Adapter tensors as in ElaLoRALinear; allocator built exactly as users do.
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.01, momentum=0.5) \
        if stream["with_optimizer"] else None
    alloc = RankAllocator(model, config, opt)
    total = sum(layer.active_rank for layer in alloc.layers)
    g = torch.Generator().manual_seed(stream["seed"])
    with torch.no_grad():
        for layer in alloc.layers:
            layer.lora_lam.uniform_(-1, 1, generator=g)  # non-zero λ so scores are not all zero
    for _ in range(config.total_steps):
        for p in alloc.params:
            grad = torch.randn(p.shape, generator=g)
            if stream["quantized"]:
                grad = grad.round().clamp(-1, 1)
            if stream["poison"]:
                bad = torch.rand(p.shape, generator=g) < stream["poison"]
                grad[bad] = torch.tensor([float("inf"), float("nan")])[torch.randint(0, 2, (int(bad.sum()),), generator=g)]
            p.grad = grad
        if opt is not None:
            for p in alloc.params:  # the optimizer never sees non-finite gradients (as with a GradScaler)
                p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0) if stream["poison"] else p.grad
            before = [p.grad.clone() for p in alloc.params]
            opt.step()
            for p, gr in zip(alloc.params, before):
                p.grad = gr
        ranks_before = [layer.active_rank for layer in alloc.layers]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            info = alloc.step()
        _check_layers(alloc, config, total)
        if info.round is not None:
            event("round moved ranks" if info.round.moved else "round moved nothing")
            for m, (name, layer) in enumerate(zip(alloc.names, alloc.layers)):
                lost, gained = info.round.pruned.get(name, 0), info.round.expanded.get(name, 0)
                assert layer.active_rank == ranks_before[m] - lost + gained
                assert lost <= config.k and gained <= config.k
                first_new = ranks_before[m] - lost
                for slot in range(first_new, first_new + gained):
                    assert abs(layer.lora_lam[slot].item()) <= 1e-13, "a new slot's λ must be ≈ 0"
                    for p_ema, lam_ema, q_ema in zip(*alloc.importance_emas()[3 * m : 3 * m + 3]):
                        assert not lam_ema[slot] and not p_ema[:, slot].any() and not q_ema[slot].any()
    # Inactive slots contribute nothing: filling them with garbage leaves every output unchanged.
    for layer in alloc.layers:
        x = torch.randn(4, layer.in_features, generator=g)
        with torch.no_grad():
            y = layer(x)
            r = layer.active_rank
            layer.lora_lam[r:] = 123.0
            layer.lora_P[:, r:] = 7.0
            layer.lora_Q[r:] = -5.0
            torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
            compiled_path = torch.nn.functional.linear(x, layer.weight, layer.bias) + layer.scale * (
                ((x @ layer.lora_Q.t()) * (layer.lora_lam * layer.active)) @ layer.lora_P.t()
            )
            torch.testing.assert_close(compiled_path, y, rtol=1e-5, atol=1e-6)
