"""Bad input: every public entry point rejects wrong shapes, dtypes, devices,
non-floating tensors and invalid configs with an error that names what was
wrong and what was expected. One case per test (parametrised)."""
import math

import pytest
import torch
import torch.nn as nn

import elalora
from elalora import ElaLoRAConfig, ElaLoRALinear, RankAllocator, inject
from elalora.reallocation import plan_round
from elalora.regularizer import orth_penalty

import _reliability_util as U
from fixtures import TinyNet, small_config


def _layer():
    torch.manual_seed(0)
    return ElaLoRALinear(8, 6, r=2, r_max=4)


# ------------------------------------------------------------------ config
CONFIG_CASES = [
    ("r", 0, r"r must be >= 1"),
    ("r", 2.0, r"r must be an int"),
    ("r", "8", r"r must be an int"),
    ("r", True, r"r must be an int"),
    ("r_max", 3, r"r_max must be >= r = 4"),
    ("r_max", 257, r"r_max must be <= 256, the kernels' limit"),
    ("lora_alpha", 0, r"lora_alpha must be a .*> 0"),
    ("lora_alpha", -1.0, r"lora_alpha must be a .*> 0"),
    ("lora_alpha", math.inf, r"lora_alpha must be a finite number"),
    ("lora_alpha", True, r"lora_alpha must be a"),
    ("lora_alpha", "16", r"lora_alpha must be a"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
    ("lora_dropout", -0.1, r"lora_dropout must be in \[0, 1\)"),
    ("lora_dropout", "0.1", r"lora_dropout must be"),
    ("beta1", 1.0, r"beta1 must be in \(0, 1\)"),
    ("beta2", 0.0, r"beta2 must be in \(0, 1\)"),
    ("beta1", math.nan, r"beta1 must be in \(0, 1\)"),
    ("b", -1, r"b must be >= 0"),
    ("k", 0, r"k must be >= 1"),
    ("t_init", -1, r"t_init must be >= 0"),
    ("t_final", -1, r"t_final must be >= 0"),
    ("mask_interval", 0, r"mask_interval must be >= 1"),
    ("total_steps", 0, r"total_steps must be an int >= 1"),
    ("total_steps", 10.5, r"total_steps must be an int >= 1"),
    ("t_final", 1.5, r"t_final must be an int or None"),  # None: follows from total_steps
    ("rank_scheduler", 1, r"rank_scheduler must be a bool"),
    ("orth_reg", -0.1, r"orth_reg must be a .*>= 0"),
    ("orth_reg", math.nan, r"orth_reg must be a"),
    ("orth_reg", math.inf, r"orth_reg must be a finite number"),
    ("target_modules", (), r"target_modules must be"),
    ("target_modules", "", r"target_modules must not be empty"),
    ("target_modules", [1], r"target_modules must be"),
    ("target_modules", "([", r"target_modules is not a valid regex"),
    ("seed", 1.5, r"seed must be an int"),
]


@pytest.mark.parametrize("field,value,match", CONFIG_CASES, ids=[f"{c[0]}={c[1]!r}" for c in CONFIG_CASES])
def test_config_rejects(field, value, match):
    kwargs = {field: value}
    if field == "r_max":
        kwargs["r"] = 4
    with pytest.raises(ValueError, match=rf"ElaLoRAConfig\.{match}"):
        ElaLoRAConfig(**kwargs)


def test_config_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        ElaLoRAConfig.from_dict({"rank": 4})


# ------------------------------------------------------ layer construction
LAYER_CASES = [
    ("r=0", dict(r=0), ValueError, r"r must be >= 1"),
    ("r=True", dict(r=True), ValueError, r"r must be an int"),
    ("r=2.5", dict(r=2.5), ValueError, r"r must be an int"),
    ("r_max<r", dict(r=4, r_max=2), ValueError, r"r_max must be >= r = 4"),
    ("r_max>256", dict(r=4, r_max=257), ValueError, r"r_max must be <= 256, the kernels' limit"),
    ("alpha=0", dict(lora_alpha=0.0), ValueError, r"lora_alpha must be a finite number > 0"),
    ("alpha<0", dict(lora_alpha=-2.0), ValueError, r"lora_alpha must be a finite number > 0"),
    ("alpha=str", dict(lora_alpha="16"), ValueError, r"lora_alpha must be a finite number > 0"),
    ("dropout=1", dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
    ("dropout=str", dict(lora_dropout="0.1"), ValueError, r"lora_dropout must be in \[0, 1\)"),
    ("generator=int", dict(generator=3), TypeError, r"generator must be a torch.Generator or None"),
    ("dtype=int64", dict(dtype=torch.int64), TypeError, r"dtype must be a floating point dtype"),
]


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES])
def test_layer_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=rf"ElaLoRALinear: {match}"):
        ElaLoRALinear(8, 6, **kwargs)


@pytest.mark.parametrize("in_f,out_f", [(0, 6), (8, 0), (-1, 6), (8.0, 6)])
def test_layer_constructor_rejects_bad_features(in_f, out_f):
    with pytest.raises(ValueError, match=r"ElaLoRALinear: in_features and out_features must be ints >= 1"):
        ElaLoRALinear(in_f, out_f)


def test_from_linear_rejects_non_linear():
    expected = r"from_linear expects an nn.Linear, transformers' Conv1D or bitsandbytes .*, got Conv1d"
    with pytest.raises(TypeError, match=expected):
        ElaLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


# ------------------------------------------------------------ layer forward
FORWARD_CASES = [
    ("wrong last dim", lambda: torch.randn(3, 7), ValueError, r"input's last dimension must be in_features = 8 \(got shape \(3, 7\)\)"),
    ("scalar", lambda: torch.tensor(1.0), ValueError, r"input's last dimension must be in_features = 8 \(got shape \(\)\)"),
    ("int64", lambda: torch.ones(3, 8, dtype=torch.long), TypeError, r"input must be a floating point tensor \(got torch.int64\)"),
    ("bool", lambda: torch.ones(3, 8, dtype=torch.bool), TypeError, r"input must be a floating point tensor \(got torch.bool\)"),
    ("float64", lambda: torch.randn(3, 8, dtype=torch.float64), TypeError, r"input dtype torch.float64 does not match the layer's torch.float32"),
    ("bfloat16 without autocast", lambda: torch.randn(3, 8).bfloat16(), TypeError, r"input dtype torch.bfloat16 does not match the layer's torch.float32.*autocast"),
    ("meta device", lambda: torch.randn(3, 8, device="meta"), ValueError, r"input is on meta but the layer is on cpu"),
    ("list", lambda: [0.0] * 8, TypeError, r"input must be a torch.Tensor \(got list\)"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_layer_forward_rejects(make, exc, match):
    with pytest.raises(exc, match=rf"ElaLoRALinear: {match}"):
        _layer()(make())


def test_layer_forward_accepts_autocast_and_odd_batches():
    layer = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 8)).dtype == torch.bfloat16
        assert layer(torch.randn(3, 8).bfloat16()).shape == (3, 6)
    assert layer(torch.randn(8)).shape == (6,)
    assert layer(torch.randn(0, 8)).shape == (0, 6)
    assert layer(torch.randn(2, 3, 5, 8)).shape == (2, 3, 5, 6)


@pytest.mark.parametrize("rank,exc,match", [
    (0, ValueError, r"active rank must be an int in \[1, 4\] \(got 0\)"),
    (5, ValueError, r"active rank must be an int in \[1, 4\] \(got 5\)"),
    (2.0, ValueError, r"active rank must be an int in \[1, 4\] \(got 2.0\)"),
])
def test_set_active_rank_rejects(rank, exc, match):
    with pytest.raises(exc, match=match):
        _layer().set_active_rank(rank)


def test_merge_twice_and_unmerge_unmerged_are_rejected():
    layer = _layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_load_of_non_prefix_mask_is_rejected():
    layer = _layer()
    state = layer.state_dict()
    state["active"] = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="not a packed prefix"):
        layer.load_state_dict(state)


# ------------------------------------------------------------------ inject
def test_inject_rejects_non_module():
    with pytest.raises(TypeError, match=r"inject expects an nn.Module as model, got str"):
        inject("model", ElaLoRAConfig())


def test_inject_rejects_non_config():
    with pytest.raises(TypeError, match=r"inject expects an ElaLoRAConfig, got dict"):
        inject(nn.Linear(2, 2), {"r": 2})


def test_inject_rejects_no_match():
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*linear layers include"):
        inject(TinyNet(), ElaLoRAConfig(target_modules=("nothing",)))


def test_inject_rejects_twice():
    model, _ = U.build()
    with pytest.raises(ValueError, match="already holds ElaLoRA adapters"):
        inject(model, small_config())


# --------------------------------------------------------------- allocator
def test_allocator_rejects_non_module():
    with pytest.raises(TypeError, match=r"RankAllocator expects an nn.Module as model, got str"):
        RankAllocator("model", small_config())


def test_allocator_rejects_non_config():
    model, _ = U.build()
    with pytest.raises(TypeError, match=r"RankAllocator expects an ElaLoRAConfig, got dict"):
        RankAllocator(model, {"r": 3})


def test_allocator_rejects_model_without_adapters():
    with pytest.raises(ValueError, match=r"no ElaLoRALinear layers \(call elalora.inject first\)"):
        RankAllocator(TinyNet(), small_config())


def test_allocator_requires_total_steps():
    model, _ = U.build()
    with pytest.raises(ValueError, match="total_steps is required"):
        RankAllocator(model, small_config(total_steps=None))


@pytest.mark.parametrize("total", [0, 2.5, 5])
def test_allocator_rejects_bad_total_steps(total):
    model, _ = U.build()
    with pytest.raises(ValueError, match=r"ElaLoRAConfig.total_steps"):
        RankAllocator(model, small_config(total_steps=None), total_steps=total)


def test_allocator_rejects_non_optimizer():
    model, _ = U.build()
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer or None, got list"):
        RankAllocator(model, small_config(), optimizer=list(model.parameters()))


def test_allocator_rejects_optimizer_without_the_adapters():
    model, _ = U.build()
    other, _ = U.build()
    opt = U.make_optimizer(other)
    with pytest.raises(ValueError, match=r"optimizer does not hold .*12 adapter parameters.*b0.query.lora_P"):
        RankAllocator(model, small_config(), opt)


def test_allocator_rejects_mixed_r_max():
    model = nn.Sequential(ElaLoRALinear(4, 4, r=2, r_max=4), ElaLoRALinear(4, 4, r=2, r_max=6))
    with pytest.raises(ValueError, match=r"every layer must share one r_max, found \[4, 6\]"):
        RankAllocator(model, small_config(r=2, r_max=4))


def test_allocator_rejects_non_bool_skip_flag():
    model, _ = U.build()
    alloc = RankAllocator(model, small_config())
    with pytest.raises(TypeError, match=r"optimizer_skipped must be a bool \(got str\)"):
        alloc.step(optimizer_skipped="yes")


def test_allocator_step_rejects_merged_model():
    model, _ = U.build()
    alloc = RankAllocator(model, small_config())
    elalora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge the adapters before training"):
        alloc.step()


# -------------------------------------------------------------- plan_round
PLAN_CASES = [
    ("rows != ranks", ([[1.0, 2.0]], [1, 1], 2, 1, 1), r"scores has 1 rows but ranks has 2 entries"),
    ("short row", ([[1.0]], [2], 2, 1, 1), r"scores\[0\] has 1 entries, fewer than its rank 2"),
    ("rank 0", ([[1.0, 2.0]], [0], 2, 1, 1), r"ranks\[0\] must be an int in \[1, r_max = 2\] \(got 0\)"),
    ("rank > r_max", ([[1.0, 2.0, 3.0]], [3], 2, 1, 1), r"ranks\[0\] must be an int in \[1, r_max = 2\] \(got 3\)"),
    ("k = 0", ([[1.0, 2.0]], [2], 2, 0, 1), r"k must be an int >= 1 \(got 0\)"),
    ("b < 0", ([[1.0, 2.0]], [2], 2, 1, -1), r"b must be an int >= 0 \(got -1\)"),
    ("r_max = 0", ([[1.0]], [1], 0, 1, 1), r"r_max must be an int >= 1 \(got 0\)"),
    ("nan score", ([[math.nan, 2.0], [1.0, 1.0]], [2, 2], 2, 1, 1), r"scores\[0\]\[0\] is nan"),
]


@pytest.mark.parametrize("args,match", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_plan_round_rejects(args, match):
    with pytest.raises(ValueError, match=rf"plan_round: {match}"):
        plan_round(*args)


# ------------------------------------------------------------ orth penalty
def test_orth_penalty_rejects_negative_coeff():
    model, _ = U.build()
    with pytest.raises(ValueError, match=r"orth_penalty: coeff must be a finite number >= 0 \(got -1.0\)"):
        orth_penalty(model, -1.0)


def test_orth_penalty_rejects_non_layers():
    with pytest.raises(TypeError, match=r"orth_penalty expects an nn.Module or a sequence of ElaLoRALinear"):
        orth_penalty("abc")


def test_orth_penalty_rejects_model_without_adapters():
    with pytest.raises(ValueError, match="no ElaLoRALinear layers found"):
        orth_penalty(nn.Linear(2, 2))
