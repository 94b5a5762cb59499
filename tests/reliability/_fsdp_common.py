"""Shared pieces of the FSDP2 tests: a tiny random-initialised BERT with ElaLoRA, its
data and the training loop, used alike by the sharded processes and by the
single-process reference run (both in _fsdp_worker.py).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import elalora  # noqa: E402
from elalora import ElaLoRAConfig, RankAllocator  # noqa: E402

STEPS = 16
RESUME_AT = 8  # rounds at 5, 7 before it and 9, 11 after it
GLOBAL_BATCH, SEQ, VOCAB, LABELS = 8, 8, 64, 3
TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")


def config() -> ElaLoRAConfig:
    # r_max = 5 and the 45-wide intermediate layer split unevenly over 2 processes.
    return ElaLoRAConfig(
        r=3, r_max=5, lora_alpha=8.0, target_modules=TARGETS, b=3, k=2,
        t_init=3, t_final=3, mask_interval=2, total_steps=STEPS, rank_scheduler=False, orth_reg=0.1, seed=7,
    )


def build() -> torch.nn.Module:
    """Two BERT layers (hidden 30, intermediate 45), no dropout, twelve adapted matrices."""
    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=VOCAB, hidden_size=30, num_hidden_layers=2, num_attention_heads=2, intermediate_size=45,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=LABELS,
    )
    model = BertForSequenceClassification(bert)
    elalora.inject(model, config())
    return model


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)


def make_scheduler(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=STEPS, pct_start=0.25)


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's equal part of the global batch of ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = ids.sum(dim=1) % LABELS
    part = GLOBAL_BATCH // world
    return ids[rank * part : (rank + 1) * part], labels[rank * part : (rank + 1) * part]


def train(model, optimizer, scheduler, allocator: RankAllocator, start: int, stop: int, rank: int = 0, world: int = 1):
    """Steps ``start .. stop-1``; a process's loss is the mean over its part of the batch."""
    infos = []
    for step in range(start, stop):
        ids, labels = batch(step, rank, world)
        loss = F.cross_entropy(model(input_ids=ids).logits, labels) + allocator.orth_penalty()
        loss.backward()
        optimizer.step()
        infos.append(allocator.step())
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return infos


def decisions(allocator: RankAllocator) -> list:
    return [(r.step, r.budget, sorted(r.pruned.items()), sorted(r.expanded.items()), r.ranks)
            for r in allocator.history]
