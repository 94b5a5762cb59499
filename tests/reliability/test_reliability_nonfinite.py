"""Non-finite gradients (docs/ALGORITHM.md §2 deviation) and optimizer-skipped steps.

* An element whose |w·g| is inf/nan keeps its EMAs; the count is returned in
  StepInfo.nonfinite and a RuntimeWarning is issued.
* ``step(optimizer_skipped=True)`` (a GradScaler overflow) is a complete no-op,
  so a run with an injected overflow step decides exactly what the run without
  it decides.
"""
import warnings

import pytest
import torch

from elalora import RankAllocator

import _reliability_util as U
from fixtures import small_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: two threads crawl on a busy machine


def _random_grads(alloc, seed):
    g = torch.Generator().manual_seed(seed)
    for p in alloc.params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _expected_ema(w, g, ipt, unc, b1, b2):
    new_ipt = b1 * ipt + (1 - b1) * (w.float() * g.float()).abs()
    new_unc = b2 * unc + (1 - b2) * ((w.float() * g.float()).abs() - new_ipt).abs()
    return new_ipt, new_unc


def test_nonfinite_elements_keep_their_emas_and_are_counted():
    config = small_config()
    model, _ = U.build(config)
    alloc = RankAllocator(model, config)
    with torch.no_grad():
        for p in alloc.params:
            p.add_(0.1)  # λ starts at 0: make every w non-zero so finite g gives a finite, non-zero ipt
    for s in range(2):
        _random_grads(alloc, s)
        assert alloc.step().nonfinite == 0
    ipt0, unc0 = alloc.ema_ipt.clone(), alloc.ema_unc.clone()

    _random_grads(alloc, 5)
    poisoned = {0: [(0, 0), (3, 1)], 1: [(2,)], 5: [(1, 4)], 11: [(0, 5)]}  # param index -> element indices
    values = [float("inf"), float("nan"), float("-inf")]
    count = 0
    for i, elems in poisoned.items():
        for e in elems:
            alloc.params[i].grad[e] = values[count % 3]
            count += 1
    expected = [
        _expected_ema(p, p.grad, vi, vu, config.beta1, config.beta2)
        for p, (vi, vu) in zip(alloc.params, alloc.importance_emas())
    ]
    old_views = [(vi.clone(), vu.clone()) for vi, vu in alloc.importance_emas()]
    with pytest.warns(RuntimeWarning, match=rf"{count} adapter gradient elements were inf/nan"):
        info = alloc.step()
    assert info.nonfinite == count == alloc.nonfinite_total()
    assert torch.isfinite(alloc.ema_ipt).all() and torch.isfinite(alloc.ema_unc).all()
    assert (alloc.ema_ipt != ipt0).any() and (alloc.ema_unc != unc0).any()  # the finite elements moved
    for i, (p, (ei, eu), (oi, ou)) in enumerate(zip(alloc.params, expected, old_views)):
        mask = torch.isfinite(p.grad)
        vi, vu = alloc.importance_emas()[i]
        assert torch.equal(vi[~mask], oi[~mask]) and torch.equal(vu[~mask], ou[~mask]), f"param {i}"
        torch.testing.assert_close(vi[mask], ei[mask], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(vu[mask], eu[mask], rtol=1e-6, atol=1e-12)


def test_zero_weight_times_inf_gradient_is_nonfinite():
    """λ starts at exactly 0: 0·inf = nan must be skipped, not written as NaN."""
    config = small_config()
    model, _ = U.build(config)
    alloc = RankAllocator(model, config)
    _random_grads(alloc, 0)
    lam_index = 1  # params are (P, λ, Q) per layer
    alloc.params[lam_index].grad.fill_(float("inf"))
    with pytest.warns(RuntimeWarning):
        info = alloc.step()
    assert info.nonfinite == alloc.params[lam_index].numel()
    assert not torch.isnan(alloc.ema_ipt).any() and not torch.isnan(alloc.ema_unc).any()


def test_clean_step_has_no_warning():
    config = small_config()
    model, _ = U.build(config)
    alloc = RankAllocator(model, config)
    _random_grads(alloc, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert alloc.step().nonfinite == 0


def test_optimizer_skipped_step_is_a_noop():
    config = small_config()
    model, _ = U.build(config)
    alloc = RankAllocator(model, config)
    _random_grads(alloc, 0)
    alloc.step()
    before = U.snapshot(model, None, alloc)
    _random_grads(alloc, 1)
    info = alloc.step(optimizer_skipped=True)
    assert info.skipped and info.round is None and info.nonfinite == 0 and info.t == 1
    U.assert_bit_identical(before, U.snapshot(model, None, alloc), "skipped step")


def _scaler_run(inject_at: int | None, steps: int = 16):
    """Train with a CPU GradScaler; ``inject_at``: an extra overflowing step before that step."""
    config = small_config(total_steps=steps)
    model, _ = U.build(config)
    opt = U.make_optimizer(model)
    sched = U.make_scheduler(opt, steps)
    alloc = RankAllocator(model, config, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plan = [(s, False) for s in range(steps)]
    if inject_at is not None:
        plan.insert(inject_at, (inject_at, True))
    skipped_steps, rounds = 0, []
    for step, overflow in plan:
        x, y = U.batch(step)
        loss = U.loss_fn(model, x, y, alloc)
        if overflow:
            loss = loss * float("inf")  # what an fp16 overflow does to the gradients
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(alloc.params, 1.0)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it skipped the step
        info = alloc.step(optimizer_skipped=skipped)
        opt.zero_grad(set_to_none=True)
        if not skipped:
            sched.step()
        skipped_steps += skipped
        if info.round is not None:
            rounds.append((info.round.step, sorted(info.round.pruned.items()), sorted(info.round.expanded.items())))
    return U.snapshot(model, opt, alloc), skipped_steps, rounds


@pytest.mark.parametrize("inject_at", [4, 7])  # in warm-up, and right before the round at t=7
def test_overflow_step_changes_no_decision(inject_at):
    clean, skipped_clean, rounds_clean = _scaler_run(None)
    hit, skipped_hit, rounds_hit = _scaler_run(inject_at)
    assert skipped_clean == 0 and skipped_hit == 1
    assert len(rounds_clean) >= 3 and any(p for _, p, _ in rounds_clean)
    assert rounds_hit == rounds_clean
    U.assert_bit_identical(clean, hit, f"overflow injected at {inject_at}")
