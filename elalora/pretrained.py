"""Adapter-only checkpoints, the Hugging Face way: ``save_pretrained`` / ``from_pretrained``.

    elalora.save_pretrained(model, "my-adapter")                # no base weights (MiniLM-L6, r=8: 1.4 MB of 94)
    base = AutoModelForSequenceClassification.from_pretrained(name)
    model = elalora.from_pretrained(base, "my-adapter")         # same logits as `model` had

The directory is the ``save_adapter`` format (see ``elalora.io``): the active
slots of every adapter, the ``modules_to_save`` weights (a trained head), the
config that injected the model, and a description of the base model
(``name_or_path``, ``model_type``) so that loading onto another architecture
fails with a clear message instead of a list of mismatched layer names.
"""
from __future__ import annotations

from pathlib import Path
import torch.nn as nn

from .architectures import model_type
from .io import AdapterLoadError, load_adapter, read_adapter_config, save_adapter
from .model import CONFIG_ATTR, adapter_layers


def base_model_info(model: nn.Module) -> dict:
    """What ``save_pretrained`` records about the base model (``None`` fields for a plain ``nn.Module``)."""
    config = getattr(model, "config", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": model_type(model),
        "architectures": getattr(config, "architectures", None),
    }


def save_pretrained(model: nn.Module, directory: str | Path, allocator=None) -> Path:
    """Write only the adapters, the ``modules_to_save`` weights, the config and the base model's name.

    The config is the one ``elalora.inject`` recorded on the model (or the
    allocator's). With ``allocator`` its state is saved too, for resuming.
    """
    config = allocator.config if allocator is not None else getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError(
            "save_pretrained: the model carries no ElaLoRA config; adapt it with elalora.inject(model, config) "
            "(or pass the allocator)"
        )
    return save_adapter(model, directory, allocator=allocator, config=config, base_model=base_model_info(model))


def from_pretrained(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the saved adapters into a fresh ``base_model`` and load them; returns ``base_model``.

    Every check (architecture, layer names, shapes, file integrity) runs before
    the model is changed: on a mismatch ``AdapterLoadError`` is raised and the
    model is left as it was. To resume training, build the allocator on the
    returned model and restore its state with ``elalora.allocator_files.load_allocator_state``.
    """
    if adapter_layers(base_model):
        raise AdapterLoadError(
            "from_pretrained: the model already holds ElaLoRA adapters; pass a fresh base model "
            "(or use elalora.load_adapter to overwrite them)"
        )
    meta = read_adapter_config(directory)
    saved = (meta.get("base_model") or {}).get("model_type")
    if saved is not None and saved != model_type(base_model):
        raise AdapterLoadError(
            f"from_pretrained: {directory} holds adapters for a {saved!r} model, "
            f"but the base model is {model_type(base_model)!r}"
        )
    load_adapter(base_model, directory)
    return base_model
