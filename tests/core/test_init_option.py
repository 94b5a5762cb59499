"""The ``init`` option: "paper" (λ = 0) and "zero_p" (P = 0, λ = 1) both start at ΔW = 0."""
import pytest
import torch
import torch.nn as nn

import elalora
from elalora import ElaLoRAConfig, ElaLoRALinear, RankAllocator, adapter_layers, inject
from elalora_kernels import reference


def _layer(in_f, out_f, r, r_max, init, dtype=torch.float32, seed=0):
    return ElaLoRALinear(in_f, out_f, r=r, r_max=r_max, lora_alpha=2 * r, init=init, dtype=dtype,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("init", ["paper", "zero_p"])
@pytest.mark.parametrize("in_f,out_f", [(1, 1), (7, 123), (123, 7), (64, 97)])
@pytest.mark.parametrize("r,r_max", [(1, 1), (3, 8), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_delta_w_is_exactly_zero_at_init(init, in_f, out_f, r, r_max, dtype):
    layer = _layer(in_f, out_f, r, r_max, init, dtype)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    x = torch.randn(5, in_f, dtype=dtype)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), base, atol=0, rtol=0)


@pytest.mark.parametrize("r,r_max", [(1, 2), (4, 7)])
def test_zero_p_starts_p_at_zero_lam_at_one_and_shares_q_with_paper(r, r_max):
    paper, zero_p = _layer(13, 9, r, r_max, "paper"), _layer(13, 9, r, r_max, "zero_p")
    assert torch.count_nonzero(zero_p.lora_P) == 0
    assert torch.equal(zero_p.lora_lam, torch.ones(r_max))
    assert torch.equal(zero_p.lora_Q, paper.lora_Q)  # the same draws: the inits differ only where they say
    assert torch.count_nonzero(paper.lora_lam) == 0 and torch.count_nonzero(paper.lora_P) > 0


@pytest.mark.parametrize("init", ["paper", "zero_p"])
@pytest.mark.parametrize("r", [1, 3])
def test_spare_slots_start_at_zero_and_r_max_does_not_change_the_draws(init, r):
    """A round initialises a slot when it activates it, so nothing is drawn for spare slots and a seed
    gives the same adapter at any r_max."""
    small, large = _layer(13, 9, r, r, init), _layer(13, 9, r, 3 * r + 1, init)
    assert torch.equal(large.lora_P[:, :r], small.lora_P) and torch.equal(large.lora_Q[:r], small.lora_Q)
    assert torch.count_nonzero(large.lora_P[:, r:]) == 0 and torch.count_nonzero(large.lora_Q[r:]) == 0


@pytest.mark.parametrize("in_f,out_f,r", [(7, 1, 1), (7, 123, 3), (64, 97, 8)])
def test_first_gradient_reaches_all_of_p_under_zero_p_and_only_lam_under_paper(in_f, out_f, r):
    """Why the option exists: with λ = 0 the task gradient of P and Q is zero; with P = 0 every entry
    of P has one (as LoRA's B). Checked against the float64 reference op."""
    x, g = torch.randn(11, in_f, dtype=torch.float64), torch.randn(11, out_f, dtype=torch.float64)
    for init in ("paper", "zero_p"):
        layer = _layer(in_f, out_f, r, 2 * r, init, torch.float64)
        layer(x).backward(g)
        ref_params = [p.detach().clone().requires_grad_() for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
        reference.adapter_linear(x, layer.weight, layer.bias, *ref_params, layer.active, layer.scale).backward(g)
        for ours, ref in zip((layer.lora_P, layer.lora_lam, layer.lora_Q), ref_params):
            torch.testing.assert_close(ours.grad, ref.grad, atol=1e-12, rtol=1e-10)
        grad_p, grad_lam, grad_q = layer.lora_P.grad[:, :r], layer.lora_lam.grad[:r], layer.lora_Q.grad[:r]
        if init == "paper":
            assert torch.count_nonzero(grad_p) == 0 and torch.count_nonzero(grad_q) == 0
            assert torch.count_nonzero(grad_lam) == r
        else:
            assert torch.count_nonzero(grad_p) == grad_p.numel()
            assert torch.count_nonzero(grad_lam) == 0 and torch.count_nonzero(grad_q) == 0


def test_bad_init_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match=r"ElaLoRAConfig\.init must be one of \('paper', 'zero_p'\).*'lora'"):
        ElaLoRAConfig(init="lora")
    with pytest.raises(ValueError, match=r"ElaLoRALinear: init must be one of .*None"):
        ElaLoRALinear(4, 4, r=1, init=None)


def test_inject_uses_the_config_init_and_it_survives_to_dict_and_save_load(tmp_path):
    config = ElaLoRAConfig(r=2, target_modules=["0", "2"], total_steps=100, t_init=10, t_final=10, init="zero_p")
    assert ElaLoRAConfig.from_dict(config.to_dict()) == config
    # A saved config is read as written; a field it lacks, init as any other, takes the default ("zero_p").
    without_init = {k: v for k, v in config.replace(init="paper").to_dict().items() if k != "init"}
    assert ElaLoRAConfig.from_dict(without_init) == config
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    inject(model, config)
    for _, layer in adapter_layers(model):
        assert torch.count_nonzero(layer.lora_P) == 0 and torch.equal(layer.lora_lam, torch.ones(layer.r_max))
    elalora.save_adapter(model, tmp_path, config=config)
    assert elalora.io.read_adapter_config(tmp_path)["config"]["init"] == "zero_p"
    fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k and "active" not in k},
                          strict=False)
    elalora.load_adapter(fresh, tmp_path)  # injects from the saved config, then loads the factors
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_rounds_under_zero_p_see_meaningful_lam_p_and_q_scores(one_thread):
    """P = 0 gives P, λ and Q zero importance at step 0; by the first round all three must have grown,
    for every active rank, and the round must move ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    config = ElaLoRAConfig(r=3, r_max=6, target_modules=["0", "2", "4"], t_init=8, t_final=4, mask_interval=4,
                           total_steps=24, b=2, k=2, init="zero_p")
    inject(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alloc = RankAllocator(model, config, opt)
    teacher = nn.Linear(16, 4)
    for _ in range(config.total_steps):
        x = torch.randn(64, 16)
        loss = nn.functional.mse_loss(model(x), teacher(x).detach()) + alloc.orth_penalty()
        loss.backward()
        opt.step()
        info = alloc.step()
        opt.zero_grad()
        if info.round is not None:
            break
    assert info.round is not None and info.round.moved > 0
    for m, (name, layer) in enumerate(zip(alloc.names, alloc.layers)):
        kept = layer.active_rank - info.round.expanded.get(name, 0)  # new ranks start with zero EMAs
        p_ipt, lam_ipt, q_ipt = (ipt for ipt, _ in alloc.importance_emas()[3 * m : 3 * m + 3])
        assert bool((p_ipt[:, :kept].mean(0) > 0).all()), f"{name}: P scores"
        assert bool((lam_ipt[:kept] > 0).all()), f"{name}: λ scores"
        assert bool((q_ipt[:kept].mean(1) > 0).all()), f"{name}: Q scores"
    assert alloc.total_rank() == 3 * config.r
