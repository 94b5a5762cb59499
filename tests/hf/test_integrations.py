"""The transformers Trainer callback: allocator timing, total steps, penalty, logs, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import elalora  # noqa: E402
from elalora.integrations import ElaLoRACallback, unwrap_optimizer  # noqa: E402

from fixtures import (BERT_SIX, bert_classifier, classification_batch, classification_data, make_trainer,  # noqa: E402
                      trainer_config)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


class GradProbe(TrainerCallback):
    """Records, at on_optimizer_step, whether adapter gradients are still there (they must be)."""

    def __init__(self):
        self.seen = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [m.lora_lam.grad for _, m in elalora.adapter_layers(model)]
        self.seen.append(all(g is not None for g in grads))


def test_trainer_runs_steps_allocator_and_logs(tmp_path):
    model = bert_classifier()
    config = trainer_config()
    elalora.inject(model, config)
    cb = ElaLoRACallback(config)
    probe = GradProbe()
    trainer = make_trainer(tmp_path, model, cb, max_steps=30, callbacks=[probe])
    before = {n: m.active_rank for n, m in elalora.adapter_layers(model)}
    trainer.train()

    alloc = cb.allocator
    assert alloc is not None
    assert alloc.config.total_steps == 30  # taken from the Trainer's state, not from the config
    assert alloc.t == 30  # stepped once per optimizer step
    assert probe.seen and all(probe.seen)  # gradients present when the allocator steps
    assert alloc.history, "rounds should have run in phase 2"
    assert [r.step for r in alloc.history] == [7, 10, 13, 16, 19, 22][: len(alloc.history)]
    assert sum(alloc.rank_pattern().values()) == sum(before.values())  # budget conserved
    assert alloc.rank_pattern() != before  # ranks actually moved
    assert alloc.ema_ipt.abs().sum() > 0  # scores saw real gradients
    assert isinstance(unwrap_optimizer(trainer.optimizer), torch.optim.AdamW)
    assert cb.allocator.optimizer is unwrap_optimizer(trainer.optimizer)

    logged = [h for h in trainer.state.log_history if "elalora/total_rank" in h]
    assert len(logged) == 7  # 6 logging steps + the end-of-training summary
    assert all(h["elalora/total_rank"] == sum(before.values()) for h in logged)
    assert sum(h["elalora/ranks_moved"] for h in logged) == sum(r.moved for r in alloc.history)
    assert all(h["elalora/orth_penalty"] > 0 for h in logged)
    assert logged[-1]["elalora/rounds"] == len(alloc.history)

    assert all(h["elalora/nonfinite_grad_elements"] == 0 for h in logged)
    record = json.loads((tmp_path / "elalora_run.json").read_text())
    assert record["rank_pattern"] == alloc.rank_pattern()
    assert len(record["history"]) == len(alloc.history)
    assert cb._hook is None  # forward hook removed after training


def test_penalty_added_to_training_loss_only():
    model = bert_classifier()
    config = trainer_config(orth_reg=0.5)
    elalora.inject(model, config)
    cb = ElaLoRACallback(config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    class S:  # minimal Trainer state/args for on_train_begin
        max_steps, global_step, is_world_process_zero = 30, 0, True

    class A:
        output_dir, gradient_accumulation_steps = "unused", 2

    make_trainer("unused", model, cb)
    cb.on_train_begin(A, S, None, model=model, optimizer=opt)
    batch = classification_batch()
    penalty = float(cb.allocator.orth_penalty().detach())
    assert penalty > 0
    model.train()
    with_pen = float(model(**batch).loss)
    with_items = float(model(**batch, num_items_in_batch=torch.tensor(8)).loss)
    cb._hook.remove()
    plain = float(model(**batch).loss)
    assert with_pen == pytest.approx(plain + penalty, rel=1e-5)
    # normalised over the accumulated batch: the penalty is split over the 2 micro-batches
    assert with_items == pytest.approx(float(model(**batch, num_items_in_batch=torch.tensor(8)).loss) + penalty / 2,
                                       rel=1e-5)
    cb._hook = model.register_forward_hook(cb._add_penalty, with_kwargs=True)
    model.eval()
    assert float(model(**batch).loss) == pytest.approx(plain, rel=1e-6)  # eval loss untouched


def test_the_callback_fills_the_default_schedule_from_the_trainers_steps(tmp_path):
    """No schedule argument: the Trainer's max_steps sets t_init, t_final, mask_interval by RankAllocator's rule."""
    model = bert_classifier()
    config = elalora.ElaLoRAConfig(r=4, target_modules=BERT_SIX, total_steps=10**6)  # total_steps: the Trainer's wins
    elalora.inject(model, config)
    cb = ElaLoRACallback(config, write_run_record=False)
    make_trainer(tmp_path, model, cb, max_steps=26).train()
    expected = config.for_run(26)
    assert (cb.allocator.config.t_init, cb.allocator.config.t_final, cb.allocator.config.mask_interval) == (
        expected.t_init, expected.t_final, expected.mask_interval) == (4, 6, 2)
    assert [rec.step for rec in cb.allocator.history] == [6, 8, 10, 12, 14, 16, 18]


def test_too_few_steps_is_a_clear_error(tmp_path):
    model = bert_classifier()
    config = trainer_config(t_init=20, t_final=20)
    elalora.inject(model, config)
    trainer = make_trainer(tmp_path, model, ElaLoRACallback(config), max_steps=30)
    with pytest.raises(ValueError, match="t_init"):
        trainer.train()


def test_a_callback_run_without_attach_is_a_clear_error(tmp_path):
    model = bert_classifier()
    config = trainer_config()
    elalora.inject(model, config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=classification_data(), callbacks=[ElaLoRACallback(config)])
    with pytest.raises(RuntimeError, match=r"not attached to its Trainer; call ElaLoRACallback\(config\).attach"):
        trainer.train()
    with pytest.raises(TypeError, match="expects a transformers Trainer"):
        ElaLoRACallback(config).attach(object())


def test_attach_puts_the_callback_first_and_wraps_the_trainer_not_the_model(tmp_path):
    model = bert_classifier()
    config = trainer_config()
    elalora.inject(model, config)
    cb, later = ElaLoRACallback(config), ElaLoRACallback(config)
    trainer = make_trainer(tmp_path, model, cb, callbacks=[later])
    assert trainer.callback_handler.callbacks[0] is cb and cb._trainer is trainer
    later.attach(trainer)  # a second attach takes the wrappers over instead of stacking them
    assert trainer.callback_handler.callbacks[0] is later
    assert trainer.train.elalora_callback is later and trainer.save_model.elalora_callback is later
    assert not hasattr(type(trainer).train, "elalora_callback") and "train" not in vars(model)


def test_model_without_adapters_is_rejected(tmp_path):
    trainer = make_trainer(tmp_path, bert_classifier(), ElaLoRACallback(trainer_config()), max_steps=12)
    with pytest.raises(ValueError, match="inject"):
        trainer.train()


def _adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or k.endswith(".active")}


@pytest.mark.parametrize("resume", ["path", "moved", "latest"],
                         ids=["in-output-dir", "moved-elsewhere", "resume_from_checkpoint=True"])
def test_resume_from_checkpoint_is_exact(tmp_path, resume):
    moved = resume == "moved"
    config = trainer_config()
    # uninterrupted run
    model_a = bert_classifier()
    elalora.inject(model_a, config)
    cb_a = ElaLoRACallback(config, write_run_record=False)
    make_trainer(tmp_path / "a", model_a, cb_a, max_steps=24).train()

    # the same run, stopped after a checkpoint at step 12, then resumed in a fresh Trainer
    model_b = bert_classifier()
    elalora.inject(model_b, config)
    cb_b = ElaLoRACallback(config, write_run_record=False)

    class StopAt12(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 12:
                control.should_training_stop = True

    make_trainer(tmp_path / "b", model_b, cb_b, max_steps=24, callbacks=[StopAt12()],
                 save_strategy="steps", save_steps=12).train()
    checkpoint = tmp_path / "b" / "checkpoint-12"
    assert os.path.isfile(checkpoint / "allocator.json")
    if moved:  # any checkpoint path, resumed with another output_dir
        checkpoint = checkpoint.rename(tmp_path / "kept")
    model_c = bert_classifier(seed=1)  # different init: everything must come from the checkpoint
    elalora.inject(model_c, config)
    cb_c = ElaLoRACallback(config, write_run_record=False)
    make_trainer(tmp_path / ("c" if moved else "b"), model_c, cb_c, max_steps=24).train(
        resume_from_checkpoint=True if resume == "latest" else str(checkpoint))

    assert cb_c.allocator.t == 24
    assert [r.step for r in cb_c.allocator.history] == [r.step for r in cb_a.allocator.history]
    assert cb_c.allocator.rank_pattern() == cb_a.allocator.rank_pattern()
    sa, sc = _adapter_state(model_a), _adapter_state(model_c)
    for key in sa:
        torch.testing.assert_close(sc[key], sa[key], rtol=1e-5, atol=1e-6, msg=key)


def test_nonfinite_gradient_elements_are_logged(tmp_path):
    model = bert_classifier()
    config = trainer_config()
    elalora.inject(model, config)
    layer = elalora.adapter_layers(model)[0][1]
    poisoned_steps = []

    def poison(grad):  # one inf in the last, inactive slot of one layer, on steps 3 and 8
        poisoned_steps.append(len(poisoned_steps))
        if poisoned_steps[-1] in (3, 8):
            grad = grad.clone()
            grad[-1] = float("inf")
        return grad

    layer.lora_lam.register_hook(poison)
    cb = ElaLoRACallback(config)
    trainer = make_trainer(tmp_path, model, cb, max_steps=12, max_grad_norm=0.0)
    with pytest.warns(RuntimeWarning, match="inf/nan"):
        trainer.train()
    counts = [h["elalora/nonfinite_grad_elements"] for h in trainer.state.log_history
              if "elalora/nonfinite_grad_elements" in h]
    # The first log (step 5) covers the inf injected at step 4; nothing is lost between logs.
    assert counts[0] >= 1
    assert sum(counts) == cb.allocator.nonfinite_total() >= 2
    assert torch.isfinite(cb.allocator.ema_ipt).all() and torch.isfinite(cb.allocator.ema_unc).all()


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_metrics_reach_tensorboard_and_callbacks_listed_before_ours(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = bert_classifier()
    config = trainer_config()
    elalora.inject(model, config)
    recorder = LogRecorder()
    trainer = make_trainer(tmp_path, model, ElaLoRACallback(config, write_run_record=False), max_steps=15,
                           callbacks=[recorder], report_to="tensorboard")
    trainer.train()
    total = sum(layer.active_rank for _, layer in elalora.adapter_layers(model))
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert len(step_logs) == 3 and all(log["elalora/total_rank"] == total for log in step_logs)

    event_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if "tfevents" in f]
    assert len(event_files) == 1
    events = EventAccumulator(event_files[0])
    events.Reload()
    assert {"train/elalora/total_rank", "train/elalora/orth_penalty", "train/elalora/rounds"} <= set(
        events.Tags()["scalars"])
    ranks = events.Scalars("train/elalora/total_rank")
    # three logging steps and the end-of-training summary
    assert [e.step for e in ranks] == [5, 10, 15, 15] and all(e.value == total for e in ranks)


def _adapter_files(directory):
    return {"adapter_config.json", "adapter_model.safetensors", "elalora_config.json", "elalora_model.safetensors",
            "allocator.json", "allocator.safetensors"} <= set(os.listdir(directory))


def test_checkpoints_and_save_model_hold_adapter_only_files(tmp_path):
    model = bert_classifier()
    config = trainer_config(task_type="SEQ_CLS")  # the head trains and travels with the adapter
    elalora.inject(model, config)
    trainer = make_trainer(tmp_path, model, ElaLoRACallback(config, write_run_record=False), max_steps=20,
                           save_strategy="steps", save_steps=10)
    trainer.train()
    assert _adapter_files(tmp_path / "checkpoint-10") and _adapter_files(tmp_path / "checkpoint-20")
    trainer.save_model(str(tmp_path / "final"))
    assert _adapter_files(tmp_path / "final")

    batch = classification_batch(labels=False)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    for directory in (tmp_path / "final", tmp_path / "checkpoint-20"):
        fresh = elalora.from_pretrained(bert_classifier(), directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("enable_first", [True, False], ids=["checkpointing-then-inject", "inject-then-checkpointing"])
def test_gradient_checkpointing_gives_the_same_gradients(enable_first):
    batch = classification_batch()
    config = trainer_config(task_type="SEQ_CLS")

    def adapter_grads(checkpointing):
        model = bert_classifier()
        if checkpointing and enable_first:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            # transformers 5 does this itself for text models (not before 5, nor for other inputs): inject must
            model.disable_input_require_grads()
        elalora.inject(model, config)
        if checkpointing and not enable_first:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        with torch.no_grad():
            for _, layer in elalora.adapter_layers(model):
                layer.lora_lam.fill_(0.5)  # λ ≠ 0: P and Q get gradients too
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert set(checkpointed) == set(plain)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.subprocess
def test_import_elalora_exposes_integrations_lazily():
    # transformers is optional: `import elalora` must not import it, `elalora.integrations` must work
    script = ("import sys, elalora; assert 'transformers' not in sys.modules; "
              "print(elalora.integrations.ElaLoRACallback.__name__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ElaLoRACallback"
