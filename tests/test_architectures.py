"""Default targets per architecture, task heads, and the error for an unknown architecture."""
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import elalora  # noqa: E402
from elalora.architectures import DEFAULT_TARGETS  # noqa: E402
from elalora.model import linear_layer_names, modules_to_save_names  # noqa: E402

import _tiny_hf as tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_in_the_table_is_tested():
    assert set(DEFAULT_TARGETS) == set(tiny.CONFIGS)


@pytest.mark.parametrize("family", sorted(tiny.CONFIGS))
def test_default_targets_adapt_attention_and_mlp_and_keep_outputs(family):
    model = tiny.model(family)
    ids = tiny.input_ids()
    extra = {"decoder_input_ids": ids} if family == "t5" else {}
    with torch.no_grad():
        before = model(input_ids=ids, **extra).last_hidden_state
    names = elalora.adapted_names(elalora.inject(model, elalora.ElaLoRAConfig(r=2)))
    assert len(names) == tiny.ADAPTED_PER_MODEL[family]
    # every linear layer of the body is adapted, except BERT-style poolers (not attention or MLP)
    assert set(linear_layer_names(model)) - set(names) <= {"pooler.dense"}
    with torch.no_grad():
        after = model(input_ids=ids, **extra).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # λ = 0: exact at initialisation


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
    model = tiny.model(family, auto=auto)
    config = elalora.ElaLoRAConfig(r=2, task_type=task)
    adapted = elalora.adapted_names(elalora.inject(model, config))
    assert modules_to_save_names(model, config) == head
    head_params = {f"{h}.{n}" for h in head for n, _ in model.get_submodule(h).named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trainable == head_params
    assert not any(a == h or a.startswith(h + ".") for a in adapted for h in head)  # heads train fully
