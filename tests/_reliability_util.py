"""Shared pieces of the reliability tests: TinyNet adapted, its data and a
training loop that records everything a run decides. Also imported by the
worker scripts the DDP and resume tests spawn, so it must stay import-light.
"""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import elalora
from elalora import ElaLoRAConfig, RankAllocator

from fixtures import IN, OUT, TinyNet, small_config

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def build(config: ElaLoRAConfig | None = None, *, seed: int = 0, dtype=None) -> tuple[nn.Module, list[str]]:
    config = config or small_config()
    torch.manual_seed(seed)
    model = TinyNet()
    if dtype is not None:
        model = model.to(dtype)
    names = elalora.adapted_names(elalora.inject(model, config))
    return model, names


# Fixed "teacher" so the task has structure and different layers matter differently.
_TEACHER = torch.Generator().manual_seed(1234)
_W_TEACHER = torch.randn(IN, OUT, generator=_TEACHER)


def batch(step: int, shard: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch of one step (and one data-parallel shard)."""
    g = torch.Generator().manual_seed(10_000 * shard + step)
    x = torch.randn(n, IN, generator=g)
    y = (x @ _W_TEACHER).argmax(dim=1)
    return x, y


def loss_fn(model, x, y, allocator: RankAllocator | None):
    loss = F.cross_entropy(model(x), y)
    if allocator is not None:
        loss = loss + allocator.orth_penalty()
    return loss


def snapshot(model: nn.Module, optimizer, allocator: RankAllocator) -> dict:
    """Everything the bit-identity checks compare, as plain CPU tensors / lists."""
    out = {}
    for name, layer in elalora.adapter_layers(model):
        name = name.removeprefix("module.")
        for attr in ("lora_P", "lora_lam", "lora_Q", "active"):
            out[f"{name}.{attr}"] = getattr(layer, attr).detach().cpu().clone()
    out["ema_ipt"] = allocator.ema_ipt.cpu().clone()
    out["ema_unc"] = allocator.ema_unc.cpu().clone()
    out["ranks"] = [layer.active_rank for layer in allocator.layers]
    out["rank_pattern"] = sorted(allocator.rank_pattern().items())
    out["history"] = [(r.step, r.budget, sorted(r.pruned.items()), sorted(r.expanded.items()), r.ranks)
                      for r in allocator.history]
    out["t"] = allocator.t
    out["generator"] = allocator.generator.get_state()
    if optimizer is not None:
        for i, p in enumerate(allocator.params):
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor):
                    out[f"opt.{i}.{key}"] = value.detach().cpu().clone()
    return out


def assert_bit_identical(a: dict, b: dict, what: str = "") -> None:
    assert a.keys() == b.keys(), f"{what}: different keys {set(a) ^ set(b)}"
    bad = []
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))
        else:
            same = x == y
        if not same:
            bad.append(key)
    assert not bad, f"{what}: not bit-identical: {bad[:10]}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: bit identity, so -0.0 != 0.0 and NaN == NaN."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra) -> dict:
    env = dict(os.environ)
    # the package, and tests/ for the helpers (fixtures, this module) the workers import by name
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


PYTHON = sys.executable


def make_optimizer(model: nn.Module, lr: float = 0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def make_scheduler(optimizer, total_steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total_steps, pct_start=0.25)


def train_steps(model, optimizer, allocator, start: int, stop: int, *, shard: int = 0, scheduler=None,
                clip: float | None = 1.0) -> list:
    """Steps ``start .. stop-1`` of the standard loop; returns the StepInfos."""
    infos = []
    for step in range(start, stop):
        x, y = batch(step, shard)
        loss = loss_fn(model, x, y, allocator)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(allocator.params, clip)
        optimizer.step()
        infos.append(allocator.step())
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    return infos
