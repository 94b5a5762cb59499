"""The runs the orthogonality-penalty-under-DDP test compares: a task × average_tokens_across_devices ×
gradient accumulation, each a few SGD steps through the Trainer with the penalty on (shared by the test,
which runs them in one process, and by _orth_ddp_worker.py, which runs them in each of 2)."""
from __future__ import annotations

import itertools
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import _trainer_run as R

GLOBAL_BATCH, STEPS = 8, 6
TASKS = {"SEQ_CLS": ("bert", AutoModelForSequenceClassification), "CAUSAL_LM": ("gpt2", AutoModelForCausalLM)}
# no dropout: the processes draw their masks from other generators than one process does
NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}
CASES = list(itertools.product(TASKS, (True, False), (1, 2)))  # (task, average_tokens_across_devices, GA steps)


def hubs(out: Path) -> None:
    for family, auto in TASKS.values():
        R.hub(out / f"hub-{family}", family, auto, **NO_DROPOUT[family])


def run(out: Path, case, *, per_device: int, **args) -> dict:
    """The adapters after ``STEPS`` optimizer steps of global batch ``GLOBAL_BATCH`` × the case's accumulation.

    Not the head: BERT's sequence-classification loss is a plain mean although the model accepts
    ``num_items_in_batch``, so with ``average_tokens_across_devices`` the Trainer's multiplication by the number
    of processes doubles its task gradient under DDP (transformers' behaviour; the head ends 1.7e-3 from one
    process's). The adapters start at λ = 0 (``init="paper"``), where the penalty is what moves P and Q.
    """
    task, average_tokens, accumulation = case
    family, auto = TASKS[task]
    model, _, _ = R.train(out / f"hub-{family}", out / "runs", auto, task, batch_size=per_device, steps=STEPS,
                          optim="sgd", save_strategy="no", gradient_accumulation_steps=accumulation,
                          average_tokens_across_devices=average_tokens, **args)
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
