"""``elalora.disable_adapters``: exactly the base model inside, exactly the adapted model after, one compiled
graph per state under torch.compile, and no orthogonality penalty from the Trainer callback inside."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import elalora

from fixtures import (bert_classifier, classification_batch, hf_model, input_ids, make_trainer, randomise_adapters,
                      trainer_config)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_inside_exactly_the_base_after_exactly_the_adapted_model(family):
    pytest.importorskip("transformers")
    base = hf_model(family)  # AutoModel: no new head, so the base model is the whole reference
    model = elalora.inject(copy.deepcopy(base), elalora.ElaLoRAConfig(r=2, r_max=3))
    randomise_adapters(model, torch.Generator().manual_seed(1))
    ids = input_ids()
    with torch.no_grad():
        expected_base, adapted = base(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        assert not torch.allclose(adapted, expected_base, atol=1e-3)  # the adapters matter
        with elalora.disable_adapters(model) as same:
            assert same is model
            inside = model(input_ids=ids).last_hidden_state
        after = model(input_ids=ids).last_hidden_state
    if family == "gpt2":  # Conv1D computes addmm(b, x, W); the base layer here F.linear(x, Wᵀ, b): rounding
        torch.testing.assert_close(inside, expected_base, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(inside, expected_base)
    assert torch.equal(after, adapted)


def _two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(elalora.ElaLoRALinear(8, 6, r=2, r_max=4), nn.Tanh(), elalora.ElaLoRALinear(6, 5, r=2))
    return randomise_adapters(model, torch.Generator().manual_seed(1))


def test_no_gradient_reaches_the_adapters_and_an_error_inside_still_switches_them_back():
    model = _two_layers()
    x = torch.randn(7, 8, requires_grad=True)
    with elalora.disable_adapters(model):
        model(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(KeyError), elalora.disable_adapters(model):
        raise KeyError("inside")
    assert all(layer.adapter_enabled for _, layer in elalora.adapter_layers(model))


def test_refuses_a_merged_model_and_a_model_without_adapters():
    model = _two_layers()
    elalora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), elalora.disable_adapters(model):
        pass
    with pytest.raises(ValueError, match="no ElaLoRA adapters"), elalora.disable_adapters(nn.Linear(2, 2)):
        pass


def test_compiled_model_compiles_once_per_state():
    torch._dynamo.reset()
    model = _two_layers()
    x = torch.randn(7, 8)
    with torch.no_grad():
        adapted = model(x)
        with elalora.disable_adapters(model):
            base = model(x)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    frames = []
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), adapted, rtol=1e-6, atol=1e-6)
            with elalora.disable_adapters(model):
                torch.testing.assert_close(compiled(x), base, rtol=1e-6, atol=1e-6)
            frames.append(counter.frame_count)
    assert frames == [2, 2, 2], f"compilations after each on/off cycle: {frames}"


def test_trainer_callback_adds_no_penalty_inside():
    pytest.importorskip("transformers")
    from elalora.integrations import ElaLoRACallback

    model = bert_classifier()
    config = trainer_config(orth_reg=0.5)
    randomise_adapters(elalora.inject(model, config), torch.Generator().manual_seed(1))
    callback = ElaLoRACallback(config)
    trainer = make_trainer("unused", model, callback)
    trainer.state.max_steps = 30  # as train() sets it before on_train_begin
    callback.on_train_begin(trainer.args, trainer.state, None, model=model,
                            optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    batch = classification_batch()
    model.train()
    with torch.no_grad():
        penalised = model(**batch).loss
        with elalora.disable_adapters(model):
            inside = model(**batch).loss
        callback._hook.remove()
        with elalora.disable_adapters(model):
            base = model(**batch).loss
        plain = model(**batch).loss
    assert penalised > plain  # the hook adds the penalty with the adapters on
    assert torch.equal(inside, base)
