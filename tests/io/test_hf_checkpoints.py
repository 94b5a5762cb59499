"""Trainer checkpoints the ecosystem loads as they are, and that resume bit for bit.

A tiny BERT and a tiny GPT-2 are saved to a folder that stands for the hub.
After a few Trainer steps with ElaLoRACallback, transformers alone (its PEFT
integration, with peft installed) and ``PeftModel.from_pretrained`` load a
checkpoint folder or a ``save_model`` folder and give the trained model's
logits; ``elalora.from_pretrained`` loads the same folder from the base's name.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

import elalora  # noqa: E402

from fixtures import input_ids  # noqa: E402
from _trainer_run import SAVE_EVERY, STEPS, train  # noqa: E402
from _trainer_run import hub as _hub  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("bert", AutoModelForSequenceClassification, "SEQ_CLS"), ("gpt2", AutoModelForCausalLM, "CAUSAL_LM")]
# PEFT adds x·Aᵀ·Bᵀ to the base output where we add s·((x Qᵀ) ⊙ λ) Pᵀ: float32 rounding of either order
LOGITS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def hub(tmp_path, family, auto):
    return _hub(tmp_path / f"hub-{family}", family, auto)


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids(batch=3, length=8, seed=2)).logits


@pytest.mark.parametrize("family, auto, task", CASES)
def test_transformers_alone_loads_checkpoints_and_save_model_folders(tmp_path, family, auto, task):
    base = hub(tmp_path, family, auto)
    model, trainer, callback = train(base, tmp_path / "run", auto, task)
    assert callback.allocator.history  # ranks moved: the adapter has a rank pattern, not one rank
    expected = logits(model)
    trainer.save_model(str(tmp_path / "final"))

    for folder in (tmp_path / "final", tmp_path / "run" / f"checkpoint-{STEPS}"):
        plain = auto.from_pretrained(folder).eval()  # transformers' own PEFT integration
        torch.testing.assert_close(logits(plain), expected, **LOGITS_TOLERANCE)
        served = peft.PeftModel.from_pretrained(auto.from_pretrained(base), folder).eval()
        torch.testing.assert_close(logits(served), expected, **LOGITS_TOLERANCE)
        for name in (None, str(base)):  # the base from the saved name, or from one given; frozen; exact
            ours = elalora.from_pretrained(name, folder)
            assert not any(p.requires_grad for p in ours.parameters())
            torch.testing.assert_close(logits(ours.eval()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family, auto, task", CASES)
def test_resume_from_a_checkpoint_folder_is_bit_exact(tmp_path, family, auto, task):
    base = hub(tmp_path, family, auto)
    straight, _, cb_straight = train(base, tmp_path / "a", auto, task)
    train(base, tmp_path / "b", auto, task, stop_at=SAVE_EVERY)
    resumed, _, cb_resumed = train(base, tmp_path / "b", auto, task,
                                   resume=str(tmp_path / "b" / f"checkpoint-{SAVE_EVERY}"))
    assert cb_resumed.allocator.t == STEPS and cb_resumed.allocator.history
    assert [r.ranks for r in cb_resumed.allocator.history] == [r.ranks for r in cb_straight.allocator.history]
    assert torch.equal(cb_resumed.allocator.ema_ipt, cb_straight.allocator.ema_ipt)
    a, b = straight.state_dict(), resumed.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
