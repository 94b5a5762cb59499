"""inject: which modules get adapters, what stays frozen, and failure cases."""
import warnings

import pytest
import torch
import torch.nn as nn

import elalora.layer
from elalora import NoAllocatorWarning, RankAllocator
from elalora import ElaLoRAConfig, ElaLoRALinear, adapted_names, adapter_layers, inject, merge, unmerge


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.value = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.query(x) + self.key(x) + self.value(x))


def _model():
    return nn.Sequential(Block(), Block(), nn.Linear(8, 2))


def test_inject_by_suffix_freezes_everything_else():
    model = _model()
    x = torch.randn(3, 8)
    expected = model(x)
    assert inject(model, ElaLoRAConfig(r=2, target_modules=("query", "value"))) is model  # PEFT-style
    names = adapted_names(model)
    assert names == ["0.query", "0.value", "1.query", "1.value"]
    assert [n for n, _ in adapter_layers(model)] == names
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{p}" for n in names for p in ("lora_P", "lora_lam", "lora_Q"))
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    # State-dict keys of the frozen weights are unchanged, so pretrained weights still load.
    assert "0.query.weight" in model.state_dict()


def test_inject_by_regex_and_seeded_init():
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    config = ElaLoRAConfig(r=2, target_modules=r"\d\.(key|query)", seed=7)
    assert adapted_names(inject(a, config)) == ["0.query", "0.key", "1.query", "1.key"]
    inject(b, config)
    for (_, la), (_, lb) in zip(adapter_layers(a), adapter_layers(b)):
        assert torch.equal(la.lora_P, lb.lora_P) and torch.equal(la.lora_Q, lb.lora_Q)


def test_all_linear_adapts_every_linear_layer_but_the_output_layer():
    model = inject(_model(), ElaLoRAConfig(r=2, target_modules="all-linear"))
    assert adapted_names(model) == ["0.query", "0.key", "0.value", "1.query", "1.key", "1.value", "2"]
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    names = adapted_names(inject(gpt2, ElaLoRAConfig(r=2, target_modules="all-linear")))
    # every Conv1D of the block; lm_head, the output layer tied to the embedding, stays as it is
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def test_training_without_an_allocator_warns_once(monkeypatch):
    monkeypatch.setattr(elalora.layer, "_warned_no_allocator", False)
    config = ElaLoRAConfig(r=2, target_modules=("query",), total_steps=50, t_init=5, t_final=5)
    x = torch.randn(3, 8)
    managed = inject(_model(), config)
    RankAllocator(managed, config)
    alone = inject(_model(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        managed(x).sum().backward()  # an allocator steps these adapters
        alone(x)  # a forward alone is no training
        alone.eval()(x).sum().backward()
    with pytest.warns(NoAllocatorWarning, match=r"RankAllocator\(model, config, optimizer\).*ElaLoRACallback"):
        alone.train()(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone(x).sum().backward()  # once


def test_the_warning_leaves_a_fullgraph_compile_alone(monkeypatch):
    monkeypatch.setattr(elalora.layer, "_warned_no_allocator", False)
    model = inject(_model(), ElaLoRAConfig(r=2, target_modules=("query",)))
    torch.compile(model, backend="aot_eager", fullgraph=True)(torch.randn(3, 8)).sum().backward()
    assert model[0].query.lora_lam.grad is not None


def test_inject_nothing_matched_names_the_layers():
    with pytest.raises(ValueError, match="matched no nn.Linear.*0.query"):
        inject(_model(), ElaLoRAConfig(target_modules=("attention",)))


def test_inject_twice_and_wrong_config():
    model = _model()
    inject(model, ElaLoRAConfig(target_modules=("query",)))
    with pytest.raises(ValueError, match="already holds"):
        inject(model, ElaLoRAConfig(target_modules=("key",)))
    with pytest.raises(TypeError, match="ElaLoRAConfig"):
        inject(_model(), {"r": 2})


def test_model_merge_unmerge():
    model = _model()
    inject(model, ElaLoRAConfig(r=2, target_modules=("query", "key", "value")))
    for _, layer in adapter_layers(model):
        nn.init.normal_(layer.lora_lam)
    x = torch.randn(4, 8)
    expected = model(x)
    merge(model)
    assert all(layer.merged for _, layer in adapter_layers(model))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert all(isinstance(m, ElaLoRALinear) for _, m in adapter_layers(model))


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(Block(), Block())
        self.classifier = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        return self.classifier(self.body(x))


@pytest.mark.parametrize("modules_to_save", [("classifier",), r"classifier", None])
def test_modules_to_save_train_fully_and_are_not_adapted(modules_to_save):
    model = Classifier()
    task = "SEQ_CLS" if modules_to_save is None else None  # None: the task's default head
    # "0" also names classifier.0, which is left out: the head trains fully
    config = ElaLoRAConfig(r=2, target_modules=("query", "key", "value", "0"), modules_to_save=modules_to_save,
                           task_type=task)
    names = adapted_names(inject(model, config))
    assert names == ["body.0.query", "body.0.key", "body.0.value", "body.1.query", "body.1.key", "body.1.value"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trainable == {"classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"}
    assert model.elalora_config is config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"modules_to_save": ("classifier", "head")}, r"modules_to_save entry 'head' matches no module"),
        ({"modules_to_save": r"heads?"}, r"modules_to_save entry 'heads\?' matches no module"),
        ({"task_type": "QUESTION_ANS"}, r"task_type='QUESTION_ANS' expects a head named one of \['qa_outputs'\]"),
        ({"target_modules": ("attention",)}, r"matched no nn.Linear or Conv1D layer"),
    ],
)
def test_bad_modules_raise_and_leave_the_model_unchanged(fields, message):
    model = Classifier()
    before = {n: (p.requires_grad, p.clone()) for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        inject(model, ElaLoRAConfig(r=2, **{"target_modules": ("query",), **fields}))
    assert [type(m) for m in model.modules()] == modules
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1])
    assert not hasattr(model, "elalora_config")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"task_type": "CLASSIFY"}, r"task_type must be None or one of"),
        ({"modules_to_save": []}, r"modules_to_save must be None, a regex string or a non-empty sequence"),
        ({"modules_to_save": "(["}, r"modules_to_save is not a valid regex"),
    ],
)
def test_config_rejects_bad_task_and_modules(fields, message):
    with pytest.raises(ValueError, match=message):
        ElaLoRAConfig(**fields)


def test_config_round_trips_new_fields():
    config = ElaLoRAConfig(modules_to_save=["classifier"], task_type="SEQ_CLS")
    assert config.modules_to_save == ("classifier",)
    assert ElaLoRAConfig.from_dict(config.to_dict()) == config
