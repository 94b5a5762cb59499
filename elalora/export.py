"""Export an ElaLoRA model as a standard PEFT LoRA adapter, for serving with ``peft``.

The two files are the PEFT part of every save (``elalora.peft_format`` says how
the adapters become ``lora_A`` / ``lora_B``), written by the same writer as
``elalora.save_adapter``; ``save_adapter`` (and so ``save_pretrained`` and the
Trainer callback) writes them beside elalora's own files, so every save is also one:

    from peft import PeftModel
    served = PeftModel.from_pretrained(base_model, export_dir)   # same outputs as ours
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch.nn as nn

from .io import write_save
from .model import CONFIG_ATTR
from .peft_format import base_model_name, saved_module_names


def export_peft_lora(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: Optional[str] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    task_type: Optional[str] = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA) to ``directory``.

    ``modules_to_save`` defaults to those of the config the model was injected
    with (e.g. ``["classifier"]``, also when the model was loaded frozen by
    ``elalora.from_pretrained``) and the modules owning other trainable
    parameters; pass ``[]`` to export the adapters only.
    ``base_model_name_or_path`` and ``task_type`` default to the model's own
    (``config._name_or_path``, the adapter config's ``task_type``). Module
    names are relative to ``model``: load the export with
    ``PeftModel.from_pretrained`` on the same base model class. The two files
    replace any earlier ones together (see ``elalora._files``). Under FSDP2 call
    it on every process, as ``save_adapter``.
    """
    if task_type is None and getattr(model, CONFIG_ATTR, None) is not None:
        task_type = getattr(model, CONFIG_ATTR).task_type
    return write_save(
        model, directory, who="export_peft_lora",
        modules_to_save=saved_module_names(model) if modules_to_save is None else list(modules_to_save),
        base_model_name_or_path=base_model_name(model) if base_model_name_or_path is None else base_model_name_or_path,
        task_type=task_type,
    )
