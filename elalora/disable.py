"""``with elalora.disable_adapters(model): ...``: the base model's outputs, for a reference pass (DPO) or a
base-vs-adapted comparison, without copying the model."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from .model import adapter_layers


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every ElaLoRA layer of ``model`` computes its base layer alone (exactly the base model's
    outputs, and no gradient reaches the adapters); on leaving, exactly the adapted outputs again.

    Under ``torch.compile`` the compiled model is guarded on the switch: it compiles once for each state
    and then reuses both graphs. ``ElaLoRACallback`` adds no orthogonality penalty inside. Merged layers
    hold the adapters in their weights and cannot be switched off: unmerge them first.
    """
    layers = [layer for _, layer in adapter_layers(model)]
    if not layers:
        raise ValueError("disable_adapters: the model has no ElaLoRA adapters")
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_adapters: the adapters are merged into the weights; unmerge them first")
    before = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.adapter_enabled = enabled


def adapters_disabled(layers) -> bool:
    """Whether the ElaLoRA ``layers`` are switched off by ``disable_adapters``."""
    return any(not layer.adapter_enabled for layer in layers)
