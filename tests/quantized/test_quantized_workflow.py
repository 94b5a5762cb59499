"""The QLoRA workflow on a transformers model loaded through ``BitsAndBytesConfig``: train (allocator,
penalty, Trainer, gradient checkpointing, bf16 autocast), save, load (elalora and PEFT), merge."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import elalora  # noqa: E402
from elalora.io import AdapterLoadError  # noqa: E402
from elalora.integrations import ElaLoRACallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny BERT classifier saved once; each test loads it quantized (bnb quantizes at load)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def load(checkpoint, kind=None):
    quantization = (
        transformers.BitsAndBytesConfig(**QUANTIZATIONS[kind], llm_int8_skip_modules=["classifier"]) if kind else None
    )
    return transformers.BertForSequenceClassification.from_pretrained(checkpoint, quantization_config=quantization)


def ela_config(**kw):
    return elalora.ElaLoRAConfig(**dict(dict(r=4, r_max=8, task_type="SEQ_CLS", t_init=1, t_final=2, mask_interval=2,
                                             b=4, k=2, total_steps=8, seed=0), **kw))


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 12), generator=g)
    return {"input_ids": ids, "labels": (ids[:, 0] > 32).long()}


def adapted(checkpoint, kind, trained=True):
    return adapted_base(load(checkpoint, kind), trained)


def adapted_base(base, trained=True):
    model = elalora.inject(base, ela_config())
    if trained:  # nonzero adapters, as after training
        with torch.no_grad():
            for _, layer in elalora.adapter_layers(model):
                layer.lora_P.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return model.eval()


def logits(model, seed=1):
    with torch.no_grad():
        return model(input_ids=batch(seed=seed)["input_ids"]).logits


def quantized_bytes(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


# ------------------------------------------------------------------------------------------------- train
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_trainer_trains_an_adapted_quantized_model(checkpoint, kind, tmp_path):
    data = [{k: v[i] for k, v in batch(32).items()} for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                                          learning_rate=5e-3, report_to="none", use_cpu=True, save_strategy="no",
                                          eval_strategy="steps", eval_steps=3, disable_tqdm=True)  # evals between steps
    with pytest.raises(ValueError, match="purely quantized"):  # the check that inject satisfies
        transformers.Trainer(model=load(checkpoint, kind), args=args, train_dataset=data)

    model = elalora.inject(load(checkpoint, kind), ela_config())
    frozen = quantized_bytes(model)
    callback = ElaLoRACallback(ela_config()).attach(
        transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
    )
    callback._trainer.train()
    assert callback.allocator.t == 8 and callback.allocator.history  # rounds ran on the quantized model
    assert all(torch.equal(p, frozen[n]) for n, p in quantized_bytes(model).items())  # base untouched
    assert all(layer.lora_P.abs().sum() > 0 for _, layer in elalora.adapter_layers(model))


def _one_step_grads(model, autocast=False):
    allocator = elalora.RankAllocator(model, ela_config(), torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch()).loss + allocator.orth_penalty()
    loss.backward()
    assert torch.isfinite(loss)
    allocator.optimizer.step()
    allocator.step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_prepare_model_for_kbit_training_is_optional(checkpoint, kind):
    """PEFT's preparation (fp32 norms, input grads, gradient checkpointing on) gives the same gradients."""
    plain = elalora.inject(load(checkpoint, kind), ela_config())
    prepared = elalora.inject(peft.prepare_model_for_kbit_training(load(checkpoint, kind)), ela_config())
    assert prepared.is_gradient_checkpointing
    ours, theirs = _one_step_grads(plain), _one_step_grads(prepared)
    assert ours.keys() == theirs.keys() and any(g.abs().sum() > 0 for g in ours.values())
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_an_evaluation_does_not_change_the_next_training_step(checkpoint, kind):
    """On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight for inference at a no-grad eval forward, a
    layout that cannot train: an evaluation between steps must leave the next step exactly as it was."""
    expected = _one_step_grads(adapted(checkpoint, kind))
    model = adapted(checkpoint, kind)
    logits(model)
    got = _one_step_grads(model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_a_base_evaluated_before_inject_trains(checkpoint, kind):
    """A base already repacked by an evaluation goes back to bitsandbytes' standard layout at inject and trains
    (bitsandbytes' own inverse rounds the block scales, so the step is not compared bit for bit)."""
    base = load(checkpoint, kind).eval()
    logits(base)
    model = adapted_base(base)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) or m.support_avx512bf16_for_cpu
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    grads = _one_step_grads(model)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith(("lora_P", "lora_Q")))


def test_bf16_autocast_step_keeps_float32_state(checkpoint):
    model = elalora.inject(load(checkpoint, "nf4"), ela_config())
    grads = _one_step_grads(model, autocast=True)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


# ------------------------------------------------------------------------------------------------- save, load
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_save_and_load_onto_a_fresh_quantized_base_is_exact(checkpoint, kind, tmp_path):
    model = adapted(checkpoint, kind)
    elalora.save_pretrained(model, tmp_path / "adapter")
    loaded = elalora.from_pretrained(load(checkpoint, kind), tmp_path / "adapter").eval()
    assert torch.equal(logits(loaded), logits(model))

    # the PEFT LoRA adapter in the same directory, onto the same quantized base
    peft_model = peft.PeftModel.from_pretrained(load(checkpoint, kind), tmp_path / "adapter").eval()
    base = load(checkpoint, kind).eval()
    for other in (peft_model, base):  # the bitsandbytes kernel elalora keeps (its inference repack rounds)
        elalora.quantized.keep_trainable_layout(other)
    base = logits(base)
    adapter_effect = (logits(model) - base).abs().max()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-3 * adapter_effect)


def test_an_adapter_for_one_quantization_is_refused_by_another(checkpoint, tmp_path):
    elalora.save_pretrained(adapted(checkpoint, "nf4"), tmp_path / "adapter")
    eight_bit = load(checkpoint, "int8")
    with pytest.raises(AdapterLoadError, match=r"layer 'bert.encoder.layer.0.attention.self.query' was trained on a "
                                               r"nf4 base but the model's base is int8"):
        elalora.from_pretrained(eight_bit, tmp_path / "adapter")
    assert not elalora.adapter_layers(eight_bit) and isinstance(
        eight_bit.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear8bitLt)
    # a float base takes it (as PEFT allows): that is how a QLoRA adapter reaches full-precision weights
    assert elalora.adapter_layers(elalora.from_pretrained(load(checkpoint), tmp_path / "adapter"))


# ------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_on_a_quantized_base(checkpoint, kind):
    model = adapted(checkpoint, kind)
    want = logits(model)
    with pytest.raises(ValueError, match=r"layer 'bert.encoder.layer.0.attention.self.query' has a quantized base"):
        elalora.merge_and_unload(model)
    assert len(elalora.adapter_layers(model)) == 12 and torch.equal(logits(model), want)  # unchanged

    # the model that just ran inference: on CPUs with AVX512-BF16 bitsandbytes has repacked its 4-bit weights
    floated = elalora.merge_and_unload(model, quantized_base="dequantize")
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in floated.modules())
    assert not getattr(floated, "is_quantized", False)
    base_gap = (logits(load(checkpoint, kind).eval()) - want).abs().max()
    # W0 + ΔW exactly, in float: what is left is bitsandbytes' own inference error (its CPU kernels compute in
    # bf16, int8 rounds the activations), measured on the base model dequantized by transformers
    bnb_error = (logits(load(checkpoint, kind).eval()) - logits(load(checkpoint, kind).dequantize().eval())).abs().max()
    assert (logits(floated) - want).abs().max() <= 2 * bnb_error + 1e-6

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        requantized = elalora.merge_and_unload(adapted(checkpoint, kind), quantized_base="requantize")
    assert any("rounded" in str(w.message) for w in caught)
    query = requantized.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt)
    assert (logits(requantized) - want).abs().max() < 0.5 * base_gap  # most of ΔW survives the rounding


def test_loading_by_name_quantizes_the_base_as_it_was(checkpoint, tmp_path, monkeypatch):
    model = adapted(checkpoint, "nf4")
    elalora.save_pretrained(model, tmp_path / "adapter")
    loaded = elalora.from_pretrained(None, tmp_path / "adapter").eval()  # the base by its recorded path
    assert loaded.bert.encoder.layer[0].attention.self.query.quantization == "nf4"
    assert torch.equal(logits(loaded), logits(model))

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'quantized and needs bitsandbytes: pip install "elalora\[bnb\]"'):
        elalora.from_pretrained(None, tmp_path / "adapter")
