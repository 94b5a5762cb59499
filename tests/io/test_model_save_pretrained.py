"""An injected transformers model's own ``save_pretrained`` / ``push_to_hub`` (also of a deep copy or an
unpickled copy) write a folder that transformers alone loads as the trained model and that
``elalora.from_pretrained`` loads exactly."""
from __future__ import annotations

import copy
import io
import logging
import os
import pickle
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

import elalora  # noqa: E402

from fixtures import hf_model, trained_hf_model  # noqa: E402
from test_hf_checkpoints import LOGITS_TOLERANCE, logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("bert", AutoModelForSequenceClassification, "SEQ_CLS"), ("gpt2", AutoModelForCausalLM, "CAUSAL_LM")]


def trained_from_hub(tmp_path, family, auto, task):
    """A model loaded from a local 'hub' folder (so it records its base's name), injected, as after training."""
    hub = tmp_path / "hub"
    hf_model(family, auto).save_pretrained(hub)
    model = trained_hf_model(family, auto, task)
    model.config._name_or_path = str(hub)
    return model.eval()


@pytest.mark.parametrize("family, auto, task", CASES)
@pytest.mark.parametrize("copy_of", ["itself", "deepcopy", "pickle"])
def test_model_save_pretrained_loads_as_the_trained_model_with_either_loader(tmp_path, family, auto, task, copy_of):
    model = trained_from_hub(tmp_path, family, auto, task)
    expected = logits(model)
    saved = {"itself": lambda m: m, "deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m))}[copy_of](model)
    if copy_of != "itself":
        with torch.no_grad():  # the copy's saver saves the copy, not the original
            next(p for n, p in model.named_parameters() if n.endswith("lora_lam")).add_(1.0)
    saved.save_pretrained(tmp_path / "out")
    plain = auto.from_pretrained(tmp_path / "out").eval()  # transformers alone
    torch.testing.assert_close(logits(plain), expected, **LOGITS_TOLERANCE)
    ours = elalora.from_pretrained(None, tmp_path / "out")
    torch.testing.assert_close(logits(ours.eval()), expected, rtol=0, atol=0)


def test_push_to_hub_uploads_the_adapter_files(tmp_path):
    model = trained_from_hub(tmp_path, "bert", AutoModelForSequenceClassification, "SEQ_CLS")
    uploaded = set()

    def upload(self, folder, repo_id, **kwargs):
        uploaded.update(os.listdir(folder))

    api = mock.Mock()
    api.return_value.create_repo.return_value.repo_id = "someone/model"
    with mock.patch("transformers.utils.hub.hf_api", api), \
            mock.patch("transformers.utils.hub.create_and_tag_model_card"), \
            mock.patch.object(type(model), "_upload_modified_files", upload):
        model.push_to_hub("someone/model")
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors",
            "elalora_config.json", "elalora_model.safetensors"} <= uploaded
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)


def test_a_model_without_a_base_name_loads_too_and_merged_saves_plainly(tmp_path):
    # built from a config: no base name
    model = trained_hf_model("bert", AutoModelForSequenceClassification, "SEQ_CLS").eval()
    model.save_pretrained(tmp_path / "nameless")
    expected = logits(model)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "nameless").eval()
    torch.testing.assert_close(logits(plain), expected, **LOGITS_TOLERANCE)
    base = hf_model("bert", AutoModelForSequenceClassification)
    torch.testing.assert_close(logits(elalora.from_pretrained(base, tmp_path / "nameless").eval()), expected,
                               rtol=0, atol=0)
    merged = elalora.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")),
                               expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, auto, task", CASES)
def test_transformers_prints_nothing_unexpected_loading_a_checkpoint(tmp_path, family, auto, task):
    """Trainer checkpoints and save_model folders: the weights file holds no adapter tensors, so transformers'
    load report has nothing to flag; resuming from them is checked in test_hf_checkpoints.py."""
    from _trainer_run import STEPS, hub, train

    base = hub(tmp_path / "hub", family, auto)
    model, trainer, _ = train(base, tmp_path / "run", auto, task)
    trainer.save_model(str(tmp_path / "final"))
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)  # transformers prints its load report through its own logger
    logging.getLogger("transformers").addHandler(handler)
    try:
        for folder in (tmp_path / "run" / f"checkpoint-{STEPS}", tmp_path / "final"):
            plain = auto.from_pretrained(folder).eval()
            torch.testing.assert_close(logits(plain), logits(model), **LOGITS_TOLERANCE)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    for word in ("UNEXPECTED", "MISSING", "lora_"):
        assert word not in printed.getvalue(), printed.getvalue()


def test_load_best_model_at_end_restores_the_best_checkpoints_adapters(tmp_path):
    """The Trainer reloads the best checkpoint's weights file, which leaves the adapters out: the callback
    loads them (and the allocator state) from the adapter files of that checkpoint."""
    from _trainer_run import SAVE_EVERY, dataset, hub, train

    auto = AutoModelForSequenceClassification
    base = hub(tmp_path / "hub", "bert", auto)
    # "best" is the highest eval loss, so that the best checkpoint is not the last one
    model, trainer, _ = train(base, tmp_path / "run", auto, "SEQ_CLS", eval_dataset=dataset("SEQ_CLS", n=8),
                              load_best_model_at_end=True, eval_strategy="steps", eval_steps=SAVE_EVERY,
                              metric_for_best_model="loss", greater_is_better=True)
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith(f"checkpoint-{SAVE_EVERY}")
    expected = elalora.from_pretrained(None, best).eval()
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=0)
