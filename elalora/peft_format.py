"""The PEFT LoRA format of a save: file names, ``adapter_config.json`` and the ``(lora_A, lora_B)`` factors.

For every adapted layer with active rank ``r`` (slots ``[0, r)``)::

    lora_B = P[:, :r] · diag(s · λ[:r])      [out, r]
    lora_A = Q[:r]                           [r, in]

so that ``lora_B @ lora_A = s · P diag(λ) Q = ΔW``. PEFT multiplies by its own
scaling ``lora_alpha / r``; ``adapter_config.json`` therefore gives every
module its rank in ``rank_pattern`` and an ``alpha_pattern`` equal to that rank,
so PEFT's scaling is exactly 1 and its ΔW is ours. Keys are the ones PEFT
writes: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``;
the ``modules_to_save`` of the config the model was injected with (a
classification head), trained or loaded frozen, and the modules of other
trainable parameters are exported as ``base_model.model.<param>`` with their
modules listed in ``modules_to_save``.

The files are written by ``elalora.io``'s one writer, with every save and by
``elalora.export_peft_lora``.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .model import CONFIG_ATTR, adapter_layers, modules_to_save_names

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def lora_factors(p: torch.Tensor, lam: torch.Tensor, q: torch.Tensor, rank: int, scale: float):
    """``(lora_A, lora_B)`` of one layer from its packed slots (whole tensors), in the slots' dtype."""
    with torch.no_grad():
        b = p[:, :rank].float() * (scale * lam[:rank].float())
        a = q[:rank].float()
    return a.to(p.dtype).contiguous(), b.to(p.dtype).contiguous()


def trained_module_names(model: nn.Module) -> list[str]:
    """The modules owning trainable parameters outside the adapters (PEFT's ``modules_to_save``)."""
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for p in layer.slot_params()}
    owners = []
    for pname, p in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if p.requires_grad and id(p) not in adapter_ids and owner and owner not in owners:
            owners.append(owner)
    return owners


def saved_module_names(model: nn.Module) -> list[str]:
    """PEFT's ``modules_to_save``: those of the model's own ElaLoRA config (frozen or not, as after loading),
    then the modules owning other trainable parameters."""
    config = getattr(model, CONFIG_ATTR, None)
    names = modules_to_save_names(model, config) if config is not None else []
    return names + [n for n in trained_module_names(model) if not any(n == m or n.startswith(m + ".") for m in names)]


def base_model_name(model: nn.Module) -> Optional[str]:
    """The name or path the base model was loaded from (transformers' ``config._name_or_path``), if any."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def peft_lora_config(
    layers: Sequence[tuple[str, object]],
    ranks: dict[str, int],
    *,
    modules_to_save: Sequence[str],
    base_model_name_or_path: Optional[str],
    task_type: Optional[str],
) -> dict:
    """PEFT's ``adapter_config.json`` for adapters of ``ranks`` (``layers``: the (name, ElaLoRALinear) pairs)."""
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT reads pattern keys as regexes matched against the end of a module name: escape the dots.
    # Every module is listed, so the file states each module's rank.
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": default_r,
        "lora_alpha": float(default_r),  # scaling = alpha / r = 1: s is folded into lora_B
        "rank_pattern": {re.escape(n): r for n, r in ranks.items()},
        "alpha_pattern": {re.escape(n): float(r) for n, r in ranks.items()},
        "target_modules": [name for name, _ in layers],
        "lora_dropout": max(layer.lora_dropout for _, layer in layers),
        "bias": "none",
        # GPT-2's Conv1D stores W as [in, out]; lora_A/lora_B are the same either way
        "fan_in_fan_out": all(layer.fan_in_fan_out for _, layer in layers),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": list(modules_to_save) or None,
    }
