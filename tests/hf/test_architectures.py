"""Default targets per architecture, task heads, and the error for an unknown architecture."""
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import elalora  # noqa: E402
from elalora.architectures import DEFAULT_TARGETS  # noqa: E402
from elalora.model import linear_layer_names, modules_to_save_names  # noqa: E402

from fixtures import ADAPTED_PER_MODEL, HF_FAMILIES, hf_model, input_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_in_the_table_is_tested():
    assert set(DEFAULT_TARGETS) == set(HF_FAMILIES)


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_default_targets_adapt_attention_and_mlp_and_keep_outputs(family):
    model = hf_model(family)
    ids = input_ids()
    extra = {"decoder_input_ids": ids} if family == "t5" else {}
    with torch.no_grad():
        before = model(input_ids=ids, **extra).last_hidden_state
    names = elalora.adapted_names(elalora.inject(model, elalora.ElaLoRAConfig(r=2)))
    assert len(names) == ADAPTED_PER_MODEL[family]
    # every linear layer of the body is adapted, except BERT-style poolers (not attention or MLP)
    assert set(linear_layer_names(model)) - set(names) <= {"pooler.dense"}
    with torch.no_grad():
        after = model(input_ids=ids, **extra).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # ΔW = 0 at initialisation, whichever start


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_every_family_forwards_base_plus_delta_w(family):
    """With P, λ ≠ 0 every adapted layer must compute x (W + ΔW)ᵀ: checked against the same model, un-injected,
    whose weights get ΔW = s·P diag(λ) Q of the active slots added by hand (a Conv1D stores W as [in, out])."""
    model, reference = hf_model(family), hf_model(family)
    ids = input_ids()
    extra = {"decoder_input_ids": ids} if family == "t5" else {}
    elalora.inject(model, elalora.ElaLoRAConfig(r=2, r_max=4))
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, elalora.ElaLoRALinear)]
    assert len(adapted) == ADAPTED_PER_MODEL[family]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base = reference(input_ids=ids, **extra).last_hidden_state
        for name, layer in adapted:
            for factor in (layer.lora_P, layer.lora_lam):  # spare slots too: they must not count
                factor.copy_(torch.randn(factor.shape, generator=gen))
            r = layer.active_rank
            delta = layer.scale * (layer.lora_P[:, :r].double() * layer.lora_lam[:r].double()) @ layer.lora_Q[:r].double()
            weight = reference.get_submodule(name).weight
            weight += (delta.t() if layer.fan_in_fan_out else delta).to(weight.dtype)
        out = model(input_ids=ids, **extra).last_hidden_state
        expected = reference(input_ids=ids, **extra).last_hidden_state
    assert (expected - base).abs().max() > 1e-2  # ΔW moves the output: the check below can see the adapter
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_unknown_architecture_lists_its_linear_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no default targets.*linear layers include \['0', '2'\]"):
        elalora.inject(model, elalora.ElaLoRAConfig(r=2))
    assert all(p.requires_grad for p in model.parameters())  # untouched


@pytest.mark.parametrize(
    "family, auto, task, head",
    [
        ("bert", transformers.AutoModelForSequenceClassification, "SEQ_CLS", ["classifier"]),
        ("roberta", transformers.AutoModelForSequenceClassification, "SEQ_CLS", ["classifier"]),
        ("distilbert", transformers.AutoModelForSequenceClassification, "SEQ_CLS", ["pre_classifier", "classifier"]),
        ("deberta-v2", transformers.AutoModelForSequenceClassification, "SEQ_CLS", ["pooler", "classifier"]),
        ("llama", transformers.AutoModelForSequenceClassification, "SEQ_CLS", ["score"]),
        ("gpt2", transformers.AutoModelForTokenClassification, "TOKEN_CLS", ["classifier"]),
        ("bert", transformers.AutoModelForQuestionAnswering, "QUESTION_ANS", ["qa_outputs"]),
        ("llama", transformers.AutoModelForCausalLM, "CAUSAL_LM", []),
    ],
)
def test_task_type_trains_the_new_head(family, auto, task, head):
    model = hf_model(family, auto)
    config = elalora.ElaLoRAConfig(r=2, task_type=task)
    adapted = elalora.adapted_names(elalora.inject(model, config))
    assert modules_to_save_names(model, config) == head
    head_params = {f"{h}.{n}" for h in head for n, _ in model.get_submodule(h).named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trainable == head_params
    assert not any(a == h or a.startswith(h + ".") for a in adapted for h in head)  # heads train fully
