"""ElaLoRALinear against the reference op, at init, through merges and masks."""
import pytest
import torch
import torch.nn as nn

from elalora import ElaLoRALinear
from elalora_kernels import reference

# (atol, rtol) for the layer vs the float64 reference of the same inputs.
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}


def _layer(in_f, out_f, r, r_max, bias=True, dtype=torch.float32, lam_seed=1):
    layer = ElaLoRALinear(in_f, out_f, bias=bias, r=r, r_max=r_max, lora_alpha=2 * r, dtype=dtype)
    g = torch.Generator().manual_seed(lam_seed)
    with torch.no_grad():  # non-zero λ so the adapter actually contributes
        layer.lora_lam.copy_(torch.randn(r_max, generator=g, dtype=dtype))
    return layer


def _reference_out(layer, x, dtype=torch.float64):
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    return reference.adapter_linear(
        x.to(dtype), cast(layer.weight), cast(layer.bias), cast(layer.lora_P), cast(layer.lora_lam),
        cast(layer.lora_Q), layer.active, layer.scale,
    )


def test_equals_base_at_init():
    base = nn.Linear(37, 23)
    x = torch.randn(5, 37)
    expected = base(x)
    layer = ElaLoRALinear.from_linear(base, r=4)
    assert layer.weight is base.weight  # shared, not copied
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


@pytest.mark.parametrize("batch", [(1,), (7,), (123,), (3, 7), (2, 1, 5)])
@pytest.mark.parametrize("in_f,out_f", [(5, 300), (300, 5), (64, 97)])
@pytest.mark.parametrize("r,r_max", [(1, 1), (3, 8), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_grads_match_reference(batch, in_f, out_f, r, r_max, dtype):
    layer = _layer(in_f, out_f, r, r_max, dtype=dtype)
    x = torch.randn(*batch, in_f, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*batch, out_f) and y.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
    ref = reference.adapter_linear(
        x64, layer.weight.double(), layer.bias.double(), *params64, layer.active, layer.scale
    )
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    for ours, theirs in zip((x, layer.lora_P, layer.lora_lam, layer.lora_Q), (x64, *params64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=atol * 10, rtol=rtol * 10)


def test_inactive_slots_contribute_nothing_and_get_zero_grad():
    layer = _layer(20, 30, r=3, r_max=8)
    x = torch.randn(11, 20)
    before = layer(x).detach()
    with torch.no_grad():  # garbage in the inactive slots must not matter
        layer.lora_P[:, 3:] = 1e3
        layer.lora_Q[3:] = -1e3
        layer.lora_lam[3:] = 7.0
    out = layer(x)
    torch.testing.assert_close(out, before, atol=0, rtol=0)
    out.square().sum().backward()
    for grad in (layer.lora_P.grad[:, 3:], layer.lora_lam.grad[3:], layer.lora_Q.grad[3:]):
        assert torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(layer.lora_P.grad[:, :3]) > 0


def test_mask_gives_same_output_as_full_reference():
    layer = _layer(17, 9, r=2, r_max=6)
    x = torch.randn(4, 17)
    torch.testing.assert_close(layer(x).double(), _reference_out(layer, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_merged_equals_unmerged(bias):
    layer = _layer(48, 33, r=4, r_max=8, bias=bias)
    layer.set_active_rank(5)
    x = torch.randn(6, 48)
    weight_before = layer.weight.clone()
    expected = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight_before, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training_and_matches_reference_mask():
    layer = _layer(40, 12, r=4, r_max=4)
    layer.lora_dropout = 0.5
    x = torch.randn(9, 40)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _reference_out(layer, x), atol=1e-5, rtol=1e-4)
    layer.train()
    torch.manual_seed(3)
    ours = layer(x)
    torch.manual_seed(3)
    ref = reference.adapter_linear(
        x, layer.weight, layer.bias, layer.lora_P, layer.lora_lam, layer.lora_Q, layer.active, layer.scale, 0.5
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_active_rank_repr_and_state_dict_round_trip():
    layer = _layer(8, 8, r=2, r_max=5)
    layer.set_active_rank(4)
    assert layer.active_rank == 4 and layer.active.tolist() == [True] * 4 + [False]
    assert "rank=4/5" in repr(layer)
    other = _layer(8, 8, r=2, r_max=5, lam_seed=9)
    other.load_state_dict(layer.state_dict())
    assert other.active_rank == 4
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), layer(x), atol=0, rtol=0)


def test_load_rejects_unpacked_active_mask():
    layer = _layer(8, 8, r=2, r_max=4)
    state = layer.state_dict()
    state["active"] = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="packed prefix"):
        layer.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"r": 0}, "r must be"), ({"r": 4, "r_max": 3}, "r_max must be"), ({"lora_dropout": 1.0}, "lora_dropout")],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElaLoRALinear(4, 4, **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        ElaLoRALinear.from_linear(nn.Conv1d(2, 2, 1))
