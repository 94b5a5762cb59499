"""The orthogonality regulariser (docs/ALGORITHM.md §6), a scalar to add to the loss."""
from __future__ import annotations

from typing import Sequence, Union

import torch.nn as nn
from torch import Tensor

import elalora_kernels

from . import fsdp
from ._checks import is_number
from .layer import ElaLoRALinear
from .model import adapter_layers


def orth_penalty(source: Union[nn.Module, Sequence[ElaLoRALinear]], coeff: float = 0.1) -> Tensor:
    """``c/(2M) Σ_m ‖Q_m Q_mᵀ − I‖_F + ‖P_mᵀ P_m − I‖_F`` over active ranks of every adapter.

    ``source`` is a model holding ElaLoRALinear layers or a sequence of them
    (``RankAllocator.orth_penalty()`` passes its own layers and coefficient).
    Under FSDP2 (adapters sharded by ``fully_shard``) it is a collective: call it
    on every process; each gets the same value and gradients for its own shards.
    """
    if isinstance(source, nn.Module):
        layers = [m for _, m in adapter_layers(source)]
    elif isinstance(source, (list, tuple)) and all(isinstance(m, ElaLoRALinear) for m in source):
        layers = list(source)
    else:
        raise TypeError(
            f"orth_penalty expects an nn.Module or a sequence of ElaLoRALinear, got {type(source).__name__}"
        )
    if not (is_number(coeff) and coeff >= 0):
        raise ValueError(f"orth_penalty: coeff must be a finite number >= 0 (got {coeff!r})")
    if not layers:
        raise ValueError("orth_penalty: no ElaLoRALinear layers found")
    if any(fsdp.is_sharded(layer.lora_P) for layer in layers):
        return fsdp.orth_penalty(layers, coeff)
    return elalora_kernels.orth_penalty(
        [layer.lora_P for layer in layers],
        [layer.lora_Q for layer in layers],
        [layer.active for layer in layers],
        coeff,
    )
