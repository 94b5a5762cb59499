"""Whole-model operations: inject adapters, find them, merge and unmerge them."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .config import ElaLoRAConfig
from .layer import ElaLoRALinear


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):  # a regex over the full module name, as in PEFT
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_names(model: nn.Module, config: ElaLoRAConfig) -> list[str]:
    """Names of the plain ``nn.Linear`` modules of ``model`` that ``config.target_modules`` selects."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and _matches(n, config.target_modules)]


def inject(model: nn.Module, config: ElaLoRAConfig) -> list[str]:
    """Replace every target ``nn.Linear`` of ``model`` by an ElaLoRALinear, in place.

    Targets match a module's full name exactly or by its last dotted parts
    (``"query"`` matches ``encoder.layer.0.attention.self.query``); a string
    ``target_modules`` is a regex over the full name. Every parameter except
    the adapters' P, λ, Q is frozen. Returns the adapted names in model order.
    Adapter initialisation draws from a generator seeded with ``config.seed``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject expects an nn.Module as model, got {type(model).__name__}")
    if not isinstance(config, ElaLoRAConfig):
        raise TypeError(f"inject expects an ElaLoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, ElaLoRALinear) for m in model.modules()):
        raise ValueError("inject: model already holds ElaLoRA adapters")
    names = target_names(model, config)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"inject: target_modules={config.target_modules!r} matched no nn.Linear; "
            f"the model's linear layers include {linears[:8]}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = ElaLoRALinear.from_linear(
            getattr(parent, child),
            r=config.r,
            r_max=config.r_max,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            generator=generator,
        )
        setattr(parent, child, layer)
    return names


def adapter_layers(model: nn.Module) -> list[tuple[str, ElaLoRALinear]]:
    """The (name, layer) pairs of every ElaLoRALinear in ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ElaLoRALinear)]


def merge(model: nn.Module) -> None:
    """Fold every adapter into its frozen weight (inference)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()
