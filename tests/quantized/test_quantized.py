"""Quantized (bitsandbytes) bases: the adapter half of the op, the layer, inject, and bad input.

The adapter-add op is held to the float64-oracle rule of tests/_kernel_oracle.py
(within a small multiple of eager PyTorch's own error). The layer is checked
against ``elalora_kernels.reference`` on a dequantized copy of the base's weight:
bitsandbytes computes the base output ``y0`` itself (8-bit also quantizes the
activations), so the bound is twice the base's own measured error (bnb vs
``F.linear`` on the dequantized weight) plus 16·eps·√d of the output's size.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")

import elalora  # noqa: E402
from elalora import ElaLoRAConfig, ElaLoRALinear, quantized  # noqa: E402
from elalora_kernels import reference  # noqa: E402
from elalora_kernels.cpu import adapter_add  # noqa: E402
from _kernel_oracle import assert_within_eager_error  # noqa: E402

SHAPES = [((1,), 7, 123, 3), ((7,), 123, 7, 1), ((2, 3), 64, 33, 5)]  # (lead dims, in, out, r)


def _adapter_inputs(lead, d_in, d_out, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "y0": torch.randn(*lead, d_out, generator=gen, dtype=torch.float64),
        "x": torch.randn(*lead, d_in, generator=gen, dtype=torch.float64),
        "P": torch.randn(d_out, r, generator=gen, dtype=torch.float64) * 0.3,
        "lam": torch.randn(r, generator=gen, dtype=torch.float64),
        "Q": torch.randn(r, d_in, generator=gen, dtype=torch.float64) * 0.3,
    }
    active = torch.arange(r) != 1  # slot 1 (when there is one) inactive
    return t, active, torch.randn(*lead, d_out, generator=gen, dtype=torch.float64)


def _run_add(fn, t, active, g, dtype, round_to=None):
    """``fn`` on inputs rounded to ``round_to`` (default ``dtype``) and evaluated in ``dtype``: output and grads."""
    leaves = {k: v.to(round_to or dtype).to(dtype).requires_grad_(True) for k, v in t.items()}
    y = fn(leaves["y0"], leaves["x"], leaves["P"], leaves["lam"], leaves["Q"], active, 2.0)
    grads = torch.autograd.grad(y, list(leaves.values()), g.to(dtype))
    return [y.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
def test_adapter_add_matches_float64_within_eager_error(shape, dtype):
    t, active, g = _adapter_inputs(*shape)
    exact = _run_add(reference.adapter_add, t, active, g.to(dtype), torch.float64, round_to=dtype)
    eager = _run_add(reference.adapter_add, t, active, g, dtype)
    ours = _run_add(adapter_add, t, active, g, dtype)
    assert_within_eager_error(ours, eager, exact, dtype, names=("y", "y0", "x", "P", "lam", "Q"))


def test_adapter_add_is_adapter_linear_minus_the_base():
    t, active, _ = _adapter_inputs((5,), 12, 9, 4)
    W = torch.randn(9, 12, dtype=torch.float64)
    args = (t["P"], t["lam"], t["Q"], active, 2.0)
    torch.testing.assert_close(
        reference.adapter_add(F.linear(t["x"], W), t["x"], *args), reference.adapter_linear(t["x"], W, None, *args)
    )


# ------------------------------------------------------------------------------------------------- layers
def _bnb_layer(kind, d_in, d_out, bias=True, compute_dtype=torch.float32, double_quant=False, seed=0):
    torch.manual_seed(seed)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            d_in, d_out, bias=bias, quant_type=kind, compute_dtype=compute_dtype, compress_statistics=double_quant
        )
    return layer.to("cpu")  # moving a bitsandbytes layer quantizes it


LAYERS = [  # (kind, compute dtype, double quantization)
    ("nf4", torch.float32, False),
    ("nf4", torch.bfloat16, True),
    ("fp4", torch.float32, True),
    ("int8", None, False),
]


@pytest.mark.parametrize("kind,compute_dtype,double_quant", LAYERS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
def test_layer_matches_reference_on_the_dequantized_weight(shape, kind, compute_dtype, double_quant, one_thread):
    lead, d_in, d_out, r = shape
    base = _bnb_layer(kind, d_in, d_out, compute_dtype=compute_dtype, double_quant=double_quant)
    layer = ElaLoRALinear.from_linear(base, r=r, r_max=r + 2, generator=torch.Generator().manual_seed(0))
    assert layer.quantization == kind and layer.base_layer is base
    assert all(p.dtype == torch.float32 for p in (layer.lora_P, layer.lora_lam, layer.lora_Q))
    with torch.no_grad():
        layer.lora_P.normal_(0, 0.3)
    x = torch.randn(*lead, d_in, requires_grad=True)
    g = torch.randn(*lead, d_out)
    y = layer(x)
    assert y.dtype == x.dtype
    y.backward(g)

    # the oracle: float64 reference on the dequantized weight; the base's own error (bnb vs F.linear) is measured
    W = quantized.dequantized_weight(base).double()
    b = base.bias.detach().double()
    x64 = x.detach().double().requires_grad_(True)
    leaves = [p.detach().double().requires_grad_(True) for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
    r_now = layer.active_rank
    ref = reference.adapter_linear(
        x64, W, b, leaves[0][:, :r_now], leaves[1][:r_now], leaves[2][:r_now], layer.active[:r_now], layer.scale
    )
    ref.backward(g.double())
    xb = x.detach().requires_grad_(True)
    y0 = base(xb)
    y0.backward(g)
    base_err_y = (y0.double() - F.linear(x64.detach(), W, b)).abs().max().item()
    base_err_dx = (xb.grad.double() - g.double() @ W).abs().max().item()

    eps = torch.finfo(compute_dtype or torch.float32).eps
    for name, ours, exact, base_err in (
        ("y", y, ref, base_err_y),
        ("x", x.grad, x64.grad, base_err_dx),
        ("P", layer.lora_P.grad[:, :r_now], leaves[0].grad[:, :r_now], 0.0),
        ("lam", layer.lora_lam.grad[:r_now], leaves[1].grad[:r_now], 0.0),
        ("Q", layer.lora_Q.grad[:r_now], leaves[2].grad[:r_now], 0.0),
    ):
        bound = 2 * base_err + 16 * eps * exact.abs().max().item() * max(d_in, d_out) ** 0.5
        assert (ours.double() - exact).abs().max().item() <= bound, name


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_adapter_runs_in_the_compute_dtype_and_grads_stay_float32(autocast, one_thread):
    layer = ElaLoRALinear.from_linear(_bnb_layer("nf4", 32, 16, compute_dtype=torch.bfloat16), r=4)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    y.float().sum().backward()
    assert layer.lora_P.grad.dtype == torch.float32 and layer.lora_P.grad.abs().sum() > 0  # P = 0 at the start: dQ = 0
    assert layer.base_layer.weight.dtype == torch.uint8 and not layer.base_layer.weight.requires_grad


# ------------------------------------------------------------------------------------------------- inject
class _HandBuilt(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.up = _bnb_layer(kind, 16, 48)
        self.down = _bnb_layer(kind, 48, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("targets", [["up", "down"], "all-linear", r".*(up|down)"])
def test_inject_finds_quantized_linears_in_a_hand_built_model(kind, targets, one_thread):
    model = _HandBuilt(kind)
    elalora.inject(model, ElaLoRAConfig(r=2, target_modules=targets))
    expected = ["up", "down"] if targets != "all-linear" else ["up", "down", "head"]
    assert elalora.adapted_names(model) == expected
    assert model.up.quantization == kind
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{k}" for n in expected for k in ("P", "lam", "Q")}
    model(torch.randn(4, 16)).sum().backward()
    assert model.up.lora_Q.grad is not None


class _Int8Weight(nn.Linear):
    """Some other quantization's linear layer: an int8 weight that no kernel here knows how to read."""

    def __init__(self):
        super().__init__(16, 16)
        self.weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize("make,named", [
    (lambda: bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=True), "has_fp16_weights=True"),
    (_Int8Weight, "_Int8Weight"),
])
def test_unsupported_quantized_layer_is_named_and_the_model_unchanged(make, named):
    model = nn.Sequential(nn.Linear(16, 16), make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for targets in (["0", "1"], "all-linear"):
        with pytest.raises(TypeError, match=rf"layer '1' .*{named}.*") as err:
            elalora.inject(model, ElaLoRAConfig(r=2, target_modules=targets))
        assert "Linear4bit" in str(err.value) or "has_fp16_weights" in str(err.value)
    assert isinstance(model[0], nn.Linear) and not hasattr(model, "elalora_config")
    assert all(p.requires_grad == (p.dtype.is_floating_point) for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_no_match_error_names_the_linear_types_found():
    with pytest.raises(ValueError, match=r"types found: \['Linear', 'Linear4bit'\]"):
        elalora.inject(_HandBuilt("nf4"), ElaLoRAConfig(r=2, target_modules=["nothing"]))


def test_a_quantized_head_cannot_train_fully():
    model = _HandBuilt("nf4")
    model.head = _bnb_layer("nf4", 16, 64)
    with pytest.raises(ValueError, match=r"'head' \(Linear4bit\).*llm_int8_skip_modules=\['head'\]"):
        elalora.inject(model, ElaLoRAConfig(r=2, target_modules=["up"], modules_to_save=["head"]))
    assert isinstance(model.up, bnb.nn.Linear4bit)


def test_merge_in_place_is_refused_before_anything_merges():
    model = _HandBuilt("nf4")
    elalora.inject(model, ElaLoRAConfig(r=2, target_modules="all-linear"))
    with pytest.raises(RuntimeError, match=r"quantized \(nf4\).*quantized_base="):
        elalora.merge(model)
    assert not any(layer.merged for _, layer in elalora.adapter_layers(model))


@pytest.mark.subprocess
def test_elalora_works_without_bitsandbytes():
    """``import elalora`` does not import bitsandbytes; a merge that needs it says what to install."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, elalora\n"
        "from elalora import quantized\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4)); elalora.inject(m, elalora.ElaLoRAConfig(r=1, "
        "target_modules=['0'])); m(torch.randn(2, 4))\n"
        "try:\n    quantized.require_bitsandbytes('merging into a quantized base')\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "elalora[bnb]"' in out.stdout


def test_parameter_counts_count_the_weights_a_4bit_layer_packs():
    model = _HandBuilt("nf4")
    elalora.inject(model, ElaLoRAConfig(r=2, target_modules=["up", "down"]))
    counts = elalora.model.parameter_counts(model)
    weights = 2 * 16 * 48 + 48 + 16 + 16 * 2 + 2  # the two quantized weights and biases, the float head
    assert counts["total"] == weights + counts["adapter_active"]
