"""ElaLoRAConfig validation: each invalid value fails at construction, naming the field and the rule."""
import pytest
import torch.nn as nn

from elalora import ElaLoRAConfig, ElaLoRALinear, RankAllocator, inject


def test_defaults():
    config = ElaLoRAConfig()
    assert config.r_max == 2 * config.r
    assert config.beta1 == config.beta2 == 0.85
    assert config.scale == config.lora_alpha / config.r


@pytest.mark.parametrize(
    "changes,field,rule",
    [
        ({"r": 0}, "r", ">= 1"),
        ({"r": 2.5}, "r", "int"),
        ({"r": 4, "r_max": 3}, "r_max", ">= r"),
        ({"lora_alpha": 0}, "lora_alpha", "> 0"),
        ({"lora_dropout": 1.0}, "lora_dropout", "[0, 1)"),
        ({"lora_dropout": -0.1}, "lora_dropout", "[0, 1)"),
        ({"beta1": 1.0}, "beta1", "(0, 1)"),
        ({"beta2": 0.0}, "beta2", "(0, 1)"),
        ({"b": -1}, "b", ">= 0"),
        ({"k": 0}, "k", ">= 1"),
        ({"t_init": -1}, "t_init", ">= 0"),
        ({"t_final": -5}, "t_final", ">= 0"),
        ({"mask_interval": 0}, "mask_interval", ">= 1"),
        ({"total_steps": 0}, "total_steps", ">= 1"),
        ({"t_init": 50, "t_final": 50, "total_steps": 100}, "total_steps", "t_init + t_final must be < total_steps"),
        ({"rank_scheduler": 1}, "rank_scheduler", "bool"),
        ({"orth_reg": -0.1}, "orth_reg", ">= 0"),
        ({"target_modules": []}, "target_modules", "non-empty"),
        ({"target_modules": ""}, "target_modules", "empty"),
        ({"seed": None}, "seed", "int"),
    ],
)
def test_invalid_values_name_field_and_rule(changes, field, rule):
    with pytest.raises(ValueError) as info:
        ElaLoRAConfig(**changes)
    message = str(info.value)
    assert f"ElaLoRAConfig.{field} " in message and rule in message


def test_round_trip_through_dict():
    config = ElaLoRAConfig(r=3, target_modules=["query", "key"], total_steps=1000)
    assert ElaLoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        ElaLoRAConfig.from_dict({**config.to_dict(), "rank": 3})


@pytest.mark.parametrize("total_steps", [1, 2, 7, 100, 123, 250, 1000, 10**6])
def test_the_default_schedule_fits_any_run_length(total_steps):
    """t_init, t_final and mask_interval left None follow from total_steps: 15% / 25% / 8%, rounded."""
    config = ElaLoRAConfig(total_steps=total_steps)  # no schedule argument needed
    run = config.for_run(total_steps)
    assert (run.t_init, run.t_final) == (round(0.15 * total_steps), round(0.25 * total_steps))
    assert run.mask_interval == max(1, round(0.08 * total_steps))
    assert run.t_init + run.t_final < total_steps
    assert (config.t_init, config.t_final, config.mask_interval) == (None, None, None)  # left for the run to fill


def test_the_study_schedule_is_the_default_and_explicit_values_stay():
    assert ElaLoRAConfig().for_run(250).to_dict() == ElaLoRAConfig(t_init=38, t_final=62, mask_interval=20,
                                                                  total_steps=250).to_dict()
    run = ElaLoRAConfig(t_init=300, mask_interval=50).for_run(2000)
    assert (run.t_init, run.t_final, run.mask_interval) == (300, 500, 50)  # given ones kept, t_final from T
    # a config filled for one length is explicit from then on: refilling it for another changes nothing
    assert ElaLoRAConfig().for_run(250).for_run(1000).t_init == 38
    with pytest.raises(ValueError, match="t_init \\+ t_final must be < total_steps"):
        ElaLoRAConfig(t_init=200).for_run(250)  # 200 + round(62.5) = 262 >= 250
    with pytest.raises(ValueError, match="t_init must be an int or None"):
        ElaLoRAConfig(t_init=2.5)


def test_the_allocator_fills_the_schedule_from_its_total_steps():
    model = nn.Sequential(nn.Linear(4, 4))
    inject(model, ElaLoRAConfig(r=2, target_modules=["0"]))
    allocator = RankAllocator(model, ElaLoRAConfig(r=2, target_modules=["0"]), total_steps=400)
    assert (allocator.config.t_init, allocator.config.t_final, allocator.config.mask_interval) == (60, 100, 32)


def test_replace_validates():
    config = ElaLoRAConfig(t_init=10, t_final=10)
    assert config.replace(total_steps=21).total_steps == 21
    with pytest.raises(ValueError, match="total_steps"):
        config.replace(total_steps=20)


@pytest.mark.parametrize("r,r_max", [(0, None), (2.5, None), (True, None), (4, 3), (4, 5.0), (4, 257)])
def test_config_and_layer_check_r_and_r_max_alike(r, r_max):
    with pytest.raises(ValueError) as from_config:
        ElaLoRAConfig(r=r, r_max=r_max)
    with pytest.raises(ValueError) as from_layer:
        ElaLoRALinear(4, 4, r=r, r_max=r_max)
    assert str(from_config.value).removeprefix("ElaLoRAConfig.") == str(from_layer.value).removeprefix("ElaLoRALinear: ")


def test_config_and_layer_default_r_max_alike():
    assert ElaLoRALinear(4, 4, r=3).r_max == ElaLoRAConfig(r=3).r_max == 6


def test_allocator_rejects_a_config_whose_r_max_is_not_the_layers():
    model = nn.Sequential(nn.Linear(4, 4))
    schedule = dict(target_modules=["0"], t_init=1, t_final=1, total_steps=10)
    inject(model, ElaLoRAConfig(r=2, r_max=3, **schedule))
    with pytest.raises(ValueError, match=r"the layers have r_max = 3 but config\.r_max = 4"):
        RankAllocator(model, ElaLoRAConfig(r=2, **schedule))
    assert RankAllocator(model, ElaLoRAConfig(r=2, r_max=3, **schedule)).r_max == 3
