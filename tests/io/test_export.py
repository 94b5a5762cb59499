"""export_peft_lora: a standard PEFT LoRA adapter that PEFT loads and that reproduces our outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import elalora  # noqa: E402
from elalora.export import export_peft_lora  # noqa: E402

from fixtures import BERT_SIX, bert_classifier, classification_batch, hf_model, input_ids, trained_hf_model  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


def trained_like(seed: int = 0):
    """A base model and an adapted copy with non-trivial λ, P, Q, uneven ranks and a changed head."""
    base = bert_classifier(seed)
    ours = copy.deepcopy(base)
    config = elalora.ElaLoRAConfig(r=4, r_max=8, lora_alpha=12.0, target_modules=BERT_SIX, seed=seed)
    elalora.inject(ours, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i, (_, layer) in enumerate(elalora.adapter_layers(ours)):
            layer.lora_lam.copy_(torch.randn(layer.r_max, generator=g))
            layer.lora_P.add_(0.3 * torch.randn(layer.lora_P.shape, generator=g))
            layer.lora_Q.add_(0.3 * torch.randn(layer.lora_Q.shape, generator=g))
            layer.set_active_rank([1, 2, 4, 7, 8, 3][i % 6])  # uneven ranks, as after reallocation
        for p in ours.classifier.parameters():
            p.requires_grad_(True)
            p.add_(torch.randn(p.shape, generator=g))
    return base, ours, config


def test_peft_from_pretrained_reproduces_our_outputs(tmp_path):
    base, ours, _ = trained_like()
    export_peft_lora(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["modules_to_save"] == ["classifier"]
    ranks = {n: m.active_rank for n, m in elalora.adapter_layers(ours)}
    assert len(cfg["rank_pattern"]) == len(ranks)
    for pattern, r in cfg["rank_pattern"].items():
        assert cfg["alpha_pattern"][pattern] == r  # PEFT scaling alpha/r = 1: s lives in lora_B

    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    served.eval()
    ours.eval()
    # every module got its own rank
    for name, module in served.base_model.model.named_modules():
        if name in ranks:
            assert module.lora_A["default"].weight.shape == (ranks[name], module.in_features)
            assert module.scaling["default"] == pytest.approx(1.0)
    x = classification_batch(16, seed=3, labels=False)
    with torch.no_grad():
        want = ours(**x).logits
        got = served(**x).logits
        plain = base.eval()(**x).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and PEFT's merge gives the same model
    merged = served.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, want, rtol=1e-4, atol=1e-5)


def test_export_tensors_are_b_equals_p_s_lambda_and_a_equals_q(tmp_path):
    from safetensors.torch import load_file

    _, ours, _ = trained_like(seed=2)
    export_peft_lora(ours, tmp_path, modules_to_save=[])
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    names = elalora.adapter_layers(ours)
    assert len(tensors) == 2 * len(names)  # no head when modules_to_save=[]
    for name, layer in names:
        r = layer.active_rank
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(a, layer.lora_Q[:r].detach())
        torch.testing.assert_close(b, layer.lora_P[:, :r].detach() * (layer.scale * layer.lora_lam[:r].detach()))
        torch.testing.assert_close(b @ a, layer.delta_weight().detach(), rtol=1e-5, atol=1e-6)


def test_export_refuses_merged_model(tmp_path):
    _, ours, _ = trained_like()
    elalora.merge(ours)
    with pytest.raises(RuntimeError, match="merged"):
        export_peft_lora(ours, tmp_path)


def test_gpt2_conv1d_export_loads_in_peft(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = hf_model("gpt2", AutoModelForSequenceClassification)
    ours = copy.deepcopy(base)
    elalora.inject(ours, elalora.ElaLoRAConfig(r=2, task_type="SEQ_CLS"))  # c_attn, c_proj, c_fc: Conv1D
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, (_, layer) in enumerate(elalora.adapter_layers(ours)):
            layer.lora_lam.copy_(torch.randn(layer.r_max, generator=g))
            layer.set_active_rank(1 + i % 4)
        ours.score.weight.add_(torch.randn(ours.score.weight.shape, generator=g))
    export_peft_lora(ours, tmp_path, task_type="SEQ_CLS")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["modules_to_save"] == ["score"]
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = input_ids()
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # the adapters matter
        torch.testing.assert_close(served(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_export_of_a_loaded_frozen_model_keeps_the_head_and_the_base_name(tmp_path, family):
    """The README's `export_peft_lora(elalora.from_pretrained(hub, dir), out)`: the loaded model is frozen, yet
    its head is exported (from the model's own adapter config), and the base's name comes from the model."""
    from transformers import AutoModelForSequenceClassification as Auto

    hub = tmp_path / "hub"
    hf_model(family, Auto).save_pretrained(hub)
    ours = trained_hf_model(family, Auto, "SEQ_CLS")
    ours.config._name_or_path = str(hub)  # as if loaded from the hub folder
    elalora.save_pretrained(ours, tmp_path / "adapter")
    loaded = elalora.from_pretrained(str(hub), tmp_path / "adapter")
    assert not any(p.requires_grad for p in loaded.parameters())
    export_peft_lora(loaded, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    head = "classifier" if family == "bert" else "score"
    assert cfg["modules_to_save"] == [head] and cfg["base_model_name_or_path"] == str(hub)
    assert cfg["task_type"] == "SEQ_CLS"
    ids = input_ids()
    with torch.no_grad():
        expected = loaded.eval()(input_ids=ids).logits
        served = peft.PeftModel.from_pretrained(Auto.from_pretrained(hub), str(tmp_path / "export")).eval()
        torch.testing.assert_close(served(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        plain = Auto.from_pretrained(tmp_path / "export").eval()  # transformers alone, the base by its name
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
