"""A few Trainer steps with ElaLoRACallback on a tiny model loaded from a local 'hub' folder (no downloads).

Shared by the checkpoint tests (tests/io/), the Trainer-under-DDP tests (tests/reliability/) and their workers.
"""
from __future__ import annotations

from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments

import elalora
from elalora.integrations import ElaLoRACallback

from fixtures import hf_model, input_ids

STEPS, SAVE_EVERY = 12, 6
# BERT's classification loss is a plain mean though the model accepts num_items_in_batch; the Trainer's token
# averaging across processes assumes that count was used (it multiplies the loss by their number): off, so
# that a DDP run of it compares with one process
NOT_TOKEN_AVERAGED = {"average_tokens_across_devices": False}


def hub(folder: Path, family: str, auto, **overrides) -> Path:
    """A tiny random model (config ``overrides``) saved to ``folder``: the name its adapters record as their base."""
    if not folder.is_dir():
        hf_model(family, auto, seed=0, **overrides).save_pretrained(folder)
    return folder


def dataset(task: str, n: int = 48):
    ids = input_ids(batch=n, length=8, seed=1)
    labels = (ids[:, 0] > 32).long() if task == "SEQ_CLS" else ids
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(base, out, auto, task, *, stop_at=None, resume=None, batch_size=8, steps=STEPS, eval_dataset=None, **args):
    """Inject, train ``steps`` steps (checkpoints every ``SAVE_EVERY``; ``args`` go to ``TrainingArguments``,
    over these defaults); returns (model in eval mode, trainer, callback)."""
    model = auto.from_pretrained(base)
    # init="paper": at this lr (2e-2, for rounds worth checking in a few steps) the zero_p start, which trains P
    # from step 1, grows the order of float additions of a DDP mean into logit differences of 2e-3 (10× the check).
    config = elalora.ElaLoRAConfig(r=2, r_max=4, task_type=task, t_init=2, t_final=3, mask_interval=2, b=2, k=1,
                                   init="paper")
    model = elalora.inject(model, config)
    defaults = dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=2e-2,
        save_strategy="steps", save_steps=SAVE_EVERY, report_to="none", use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, logging_steps=SAVE_EVERY,
    )
    args = TrainingArguments(**{**defaults, **args})
    trainer = Trainer(model=model, args=args, train_dataset=dataset(task), eval_dataset=eval_dataset,
                      callbacks=[StopAt(stop_at)] if stop_at else [])
    callback = ElaLoRACallback(config, write_run_record=False).attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model.eval(), trainer, callback
