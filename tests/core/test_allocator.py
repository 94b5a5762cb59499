"""RankAllocator: rounds on controlled scores, expansion, optimizer-state surgery, resume state."""
import copy

import pytest
import torch
import torch.nn as nn

from elalora import ElaLoRAConfig, RankAllocator, adapter_layers, inject
from elalora_kernels import reference

BETA = 0.85

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: two threads crawl on a busy machine


def _model(widths=((12, 20), (20, 20), (20, 9))):
    torch.manual_seed(0)
    layers = [nn.Linear(i, o) for i, o in widths]
    return nn.Sequential(*layers)


def _config(**changes):
    base = dict(r=3, r_max=6, target_modules=r"\d", t_init=0, t_final=0, mask_interval=1,
                total_steps=1000, b=2, k=2, rank_scheduler=False, seed=3)
    return ElaLoRAConfig(**{**base, **changes})


def _setup(optimizer=False, **changes):
    model = _model()
    config = _config(**changes)
    inject(model, config)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_lam.normal_()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2) if optimizer else None
    return model, RankAllocator(model, config, opt), opt


def _set_slot_importance(alloc, m, values):
    """Give every element of slot j of layer m the EMAs (v_j, v_j).

    With no gradient the next update makes Ī = β·v and Ū ∝ v, so the rank
    score S_j ∝ v_j² and the order of slots is the order of ``values``.
    """
    for pair, dim in zip(alloc.importance_emas()[3 * m : 3 * m + 3], (1, 0, 0)):
        for view in pair:
            for j, v in enumerate(values):
                view.select(dim, j).fill_(v)


def _zero_grads(model):
    for p in model.parameters():
        p.grad = None


def test_round_prunes_weak_layer_and_expands_strong_one():
    model, alloc, _ = _setup()
    alloc.step()  # t = 0: warm-up
    _set_slot_importance(alloc, 0, [1.0, 0.1, 0.2, 9, 9, 9])  # two weakest ranks in the whole model
    _set_slot_importance(alloc, 1, [5.0, 6.0, 7.0, 9, 9, 9])
    _set_slot_importance(alloc, 2, [8.0, 9.0, 10.0, 0, 0, 0])  # its weakest still strongest: grows
    info = alloc.step()
    assert info.round is not None and info.round.pruned == {"0": 2} and info.round.expanded == {"2": 2}
    assert alloc.rank_pattern() == {"0": 1, "1": 3, "2": 5}
    assert alloc.total_rank() == 9
    assert [layer.active.tolist() for _, layer in adapter_layers(model)][2] == [True] * 5 + [False]
    assert alloc.history == [info.round]


def test_new_ranks_are_orthogonal_with_negligible_lambda_and_zero_emas():
    model, alloc, _ = _setup()
    layers = [layer for _, layer in adapter_layers(model)]
    alloc.step()
    _set_slot_importance(alloc, 0, [1.0, 0.1, 0.2])
    _set_slot_importance(alloc, 1, [5.0, 6.0, 7.0])
    _set_slot_importance(alloc, 2, [8.0, 9.0, 10.0])
    before_Q = layers[2].lora_Q[:3].clone()
    alloc.step()
    layer = layers[2]
    assert torch.equal(layer.lora_Q[:3], before_Q)  # kept ranks untouched
    for new in (3, 4):
        q, p = layer.lora_Q[new].double(), layer.lora_P[:, new].double()
        assert abs(q.norm() - 1) < 1e-6 and abs(p.norm() - 1) < 1e-6
        assert (layer.lora_Q[:new].double() @ q).abs().max() < 1e-6
        assert (layer.lora_P[:, :new].double().t() @ p).abs().max() < 1e-6
        assert 0 <= layer.lora_lam[new] <= 1e-13
        for p_ema, lam_ema, q_ema in zip(*alloc.importance_emas()[6:9]):  # layer 2: importance, then uncertainty
            assert lam_ema[new] == 0 and q_ema[new].abs().sum() == 0 and p_ema[:, new].abs().sum() == 0


def _train_steps(model, opt, alloc, n, seed=0, extra=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 12, generator=g)
        loss = model(x).square().mean() + alloc.orth_penalty()
        if extra is not None:
            loss = loss + extra.square().sum()
        loss.backward()
        opt.step()
        yield alloc.step()
        opt.zero_grad()


def test_optimizer_state_of_kept_slots_moves_with_them_and_new_slots_start_at_zero():
    model, alloc, opt = _setup(optimizer=True, t_init=3, mask_interval=100)
    extra = nn.Parameter(torch.randn(5))  # an unrelated parameter in its own group
    opt.add_param_group({"params": [extra], "weight_decay": 0.5, "lr": 3e-3})
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for _ in _train_steps(model, opt, alloc, 4, extra=extra):
        scheduler.step()
    layers = [layer for _, layer in adapter_layers(model)]
    params = [p for layer in layers for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
    state_before = {p: copy.deepcopy(opt.state[p]) for p in params + [extra]}
    Q_before = [layer.lora_Q.detach().clone() for layer in layers]
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    sched_before = copy.deepcopy(scheduler.state_dict())

    # Force a round at the next step (t = 103 would be the first; call the round step directly).
    alloc.t = 3 + 100
    _set_slot_importance(alloc, 0, [1.0, 0.1, 0.2])
    _set_slot_importance(alloc, 1, [5.0, 6.0, 7.0])
    _set_slot_importance(alloc, 2, [8.0, 9.0, 10.0])
    _zero_grads(model)
    info = alloc.step()
    assert info.round.moved == 2

    assert torch.equal(opt.state[extra]["exp_avg"], state_before[extra]["exp_avg"])
    assert torch.equal(opt.state[extra]["exp_avg_sq"], state_before[extra]["exp_avg_sq"])
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert scheduler.state_dict() == sched_before
    next_lrs = [1.0 / (1 + scheduler.last_epoch + 1) * g["initial_lr"] for g in opt.param_groups]
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx(next_lrs, rel=0, abs=0)

    new_slots = 0
    for m, layer in enumerate(layers):
        for slot in range(layer.active_rank):
            match = [j for j in range(layer.r_max) if torch.equal(Q_before[m][j], layer.lora_Q[slot])]
            for param, dim in zip((layer.lora_P, layer.lora_lam, layer.lora_Q), (1, 0, 0)):
                for key in ("exp_avg", "exp_avg_sq"):
                    now = opt.state[param][key].select(dim, slot)
                    if match:  # a kept rank: its moments moved with it, bit for bit
                        assert torch.equal(now, state_before[param][key].select(dim, match[0]))
                    else:  # a new rank: its moments start at zero
                        assert torch.count_nonzero(now) == 0
            new_slots += not match
        assert torch.equal(opt.state[layer.lora_lam]["step"], state_before[layer.lora_lam]["step"])
    assert new_slots == 2


def test_many_rounds_conserve_total_rank_within_bounds():
    model, alloc, opt = _setup(optimizer=True, b=3, k=2, mask_interval=10, r_max=5)
    total = alloc.total_rank()
    changed = False
    start = alloc.rank_pattern()
    for info in _train_steps(model, opt, alloc, 150):
        assert alloc.total_rank() == total
        assert all(1 <= r <= 5 for r in alloc.rank_pattern().values())
        changed |= alloc.rank_pattern() != start
        for _, layer in adapter_layers(model):  # the active slots are a packed prefix
            r = layer.active_rank
            assert layer.active[:r].all() and not layer.active[r:].any()
    assert changed and len(alloc.history) == 14  # rounds at t = 10, 20, ..., 140
    assert torch.isfinite(alloc.ema_ipt).all() and torch.isfinite(alloc.ema_unc).all()


def test_rank_scores_match_reference():
    model, alloc, opt = _setup(optimizer=True)
    list(_train_steps(model, opt, alloc, 3))
    ipt, unc = zip(*alloc.importance_emas())
    ipt = [ipt[3 * i : 3 * i + 3] for i in range(3)]
    unc = [unc[3 * i : 3 * i + 3] for i in range(3)]
    torch.testing.assert_close(alloc.rank_scores(), reference.rank_scores(ipt, unc), atol=0, rtol=0)


def test_emas_follow_reference_update():
    model, alloc, opt = _setup(optimizer=True, t_init=10)
    list(_train_steps(model, opt, alloc, 2))
    ipt_before, unc_before = alloc.ema_ipt.clone(), alloc.ema_unc.clone()
    x = torch.randn(4, 12)
    model(x).sum().backward()
    params = alloc.params
    ref_ipt = [ipt.clone() for ipt, _ in alloc.importance_emas()]
    ref_unc = [unc.clone() for _, unc in alloc.importance_emas()]
    reference.score_ema_update(params, [p.grad for p in params], ref_ipt, ref_unc, BETA, BETA)
    alloc.step()
    for (ipt, unc), ref_i, ref_u in zip(alloc.importance_emas(), ref_ipt, ref_unc):
        for ours, expected in ((ipt, ref_i), (unc, ref_u)):
            torch.testing.assert_close(ours, expected, atol=0, rtol=0)
            assert ours.data_ptr() % 16 == 0  # every view is 16-byte aligned for vector loads
    assert not torch.equal(alloc.ema_ipt, ipt_before) and not torch.equal(alloc.ema_unc, unc_before)


def test_optimizer_skipped_step_changes_nothing():
    model, alloc, opt = _setup(optimizer=True)
    list(_train_steps(model, opt, alloc, 2))
    before = alloc.state_dict()
    model(torch.randn(3, 12)).sum().backward()
    info = alloc.step(optimizer_skipped=True)
    assert info.skipped and info.round is None
    after = alloc.state_dict()
    assert after["t"] == before["t"] and torch.equal(after["ema_ipt"], before["ema_ipt"])


def test_stabilisation_phase_freezes_scores_and_ranks():
    model, alloc, opt = _setup(optimizer=True, t_init=1, t_final=5, total_steps=10, mask_interval=1)
    infos = list(_train_steps(model, opt, alloc, 10))
    assert [i.phase for i in infos] == [1, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    frozen = alloc.ema_ipt.clone()
    model(torch.randn(3, 12)).sum().backward()
    alloc.t = 5
    assert alloc.step().round is None and torch.equal(alloc.ema_ipt, frozen)


def test_state_dict_round_trip_and_rejections():
    model, alloc, opt = _setup(optimizer=True)
    list(_train_steps(model, opt, alloc, 5))
    state = alloc.state_dict()
    other = RankAllocator(model, alloc.config, opt)
    other.load_state_dict(state)
    assert other.t == alloc.t and torch.equal(other.ema_unc, alloc.ema_unc) and other.history == alloc.history
    assert torch.equal(other.generator.get_state(), alloc.generator.get_state())

    different = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 9))
    inject(different, alloc.config)
    with pytest.raises(ValueError, match="different model"):
        RankAllocator(different, alloc.config).load_state_dict(state)
    with pytest.raises(ValueError, match="config differs.*'b'"):
        RankAllocator(model, alloc.config.replace(b=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="not an allocator state"):
        other.load_state_dict({"t": 3})


def test_constructor_and_step_errors():
    with pytest.raises(ValueError, match="no ElaLoRALinear"):
        RankAllocator(_model(), _config())
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="total_steps is required"):
        RankAllocator(model, _config(total_steps=None))
    with pytest.raises(ValueError, match="t_init \\+ t_final must be < total_steps"):
        RankAllocator(model, _config(total_steps=None, t_init=5, t_final=5), total_steps=10)
    alloc = RankAllocator(model, _config())
    model[0].merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        alloc.step()
