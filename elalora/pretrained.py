"""Adapter-only checkpoints, the Hugging Face way: ``save_pretrained`` / ``from_pretrained``.

    elalora.save_pretrained(model, "my-adapter")            # no base weights (sizes: docs/RELIABILITY.md)
    model = elalora.from_pretrained(name, "my-adapter")     # same logits as `model` had; frozen, for inference
    model = elalora.from_pretrained(base, "my-adapter", is_trainable=True)   # to train on

An injected transformers model's own ``model.save_pretrained(dir)`` (and so
``push_to_hub``) writes transformers' full save and these files beside it, as
a Trainer checkpoint holds them (``SavesAdaptersToo``).

The directory is the ``save_adapter`` layout (see ``elalora.io``): a PEFT LoRA
adapter that transformers and PEFT load by themselves, and elalora's exact
state (every slot, the ``modules_to_save`` weights such as a trained head, the
config that injected the model), with a description of the base model
(``name_or_path``, ``model_type``, its class) so that the base can be loaded by
name and loading onto another architecture fails with a clear message instead
of a list of mismatched layer names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch.nn as nn

from . import fsdp, quantized
from .architectures import model_type
from .io import AdapterLoadError, load_adapter, read_adapter_config, save_adapter
from .layer import ElaLoRALinear
from .model import CONFIG_ATTR, adapter_layers, without_adapter_flag
from .peft_format import base_model_name


def base_model_info(model: nn.Module) -> dict:
    """What ``save_pretrained`` records about the base model (``None`` fields for a plain ``nn.Module``)."""
    config = getattr(model, "config", None)
    return {
        "name_or_path": base_model_name(model),
        "model_type": model_type(model),
        "architectures": getattr(config, "architectures", None),
        "class": type(model).__name__,
        "quantization_config": quantized.quantization_config(model),  # loading by name quantizes the same way
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


def from_pretrained(
    base_model: Union[nn.Module, str, Path, None], directory: str | Path, *, is_trainable: bool = False
) -> nn.Module:
    """Inject the saved adapters into ``base_model`` and load them; returns the model.

    ``base_model`` is a fresh model, or a name or path to load it from with the
    transformers class it had when saved (``None``: the saved
    ``base_model_name_or_path``). By default the model is for inference: every
    parameter is frozen. ``is_trainable=True`` keeps the adapters and the
    ``modules_to_save`` trainable, to continue training (build the allocator on
    the returned model and restore its state with
    ``elalora.allocator_files.load_allocator_state``).

    Every check (architecture, layer names, shapes, file integrity) runs before
    the model is changed: on a mismatch ``AdapterLoadError`` is raised and the
    model is left as it was.
    """
    meta = read_adapter_config(directory)
    saved = meta.get("base_model") or {}
    if base_model is None or isinstance(base_model, (str, Path)):
        class_name = saved.get("class") or (saved.get("architectures") or [None])[0]
        base_model = _load_base(
            base_model or saved.get("name_or_path"), class_name, directory, saved.get("quantization_config")
        )
    if adapter_layers(base_model):
        raise AdapterLoadError(
            "from_pretrained: the model already holds ElaLoRA adapters; pass a fresh base model "
            "(or use elalora.load_adapter to overwrite them)"
        )
    if saved.get("model_type") is not None and saved["model_type"] != model_type(base_model):
        raise AdapterLoadError(
            f"from_pretrained: {directory} holds adapters for a {saved['model_type']!r} model, "
            f"but the base model is {model_type(base_model)!r}"
        )
    load_adapter(base_model, directory)
    if not is_trainable:
        base_model.requires_grad_(False)
    return base_model


def _load_base(name_or_path, class_name, directory, quantization: dict | None = None) -> nn.Module:
    """The base model ``class_name.from_pretrained(name_or_path)`` (a transformers class), quantized as saved."""
    if not name_or_path:
        raise AdapterLoadError(
            f"from_pretrained: {directory} records no base model name or path; pass the base model itself"
        )
    import transformers

    cls = getattr(transformers, class_name or "", None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise AdapterLoadError(
            f"from_pretrained: the base model's class {class_name!r} recorded in {directory} is not a transformers "
            "class; load the base model yourself and pass it"
        )
    if quantization is None:
        return cls.from_pretrained(str(name_or_path))
    if quantization.get("quant_method") != "bitsandbytes":
        raise AdapterLoadError(
            f"from_pretrained: the base model recorded in {directory} was quantized with "
            f"{quantization.get('quant_method')!r}; load the base model yourself and pass it"
        )
    quantized.require_bitsandbytes(f"from_pretrained: the base model recorded in {directory} is quantized and")
    config = transformers.BitsAndBytesConfig.from_dict(quantization)
    return cls.from_pretrained(str(name_or_path), quantization_config=config)


def save_through_transformers(model: nn.Module) -> None:
    """Make a transformers model's own ``save_pretrained`` (and so ``push_to_hub`` and the Trainer's
    checkpoints) write the adapter files beside its full save, and leave the adapters' tensors out of its
    weights file (called by ``inject``).

    Transformers alone then loads such a folder as the trained model, with nothing unexpected to report:
    the base and the head from its weights file, the adapters from the PEFT files beside it. The Trainer,
    resuming from such a checkpoint, finds exactly the keys it was told to leave out missing, and
    ``ElaLoRACallback`` loads the adapters from elalora's files.
    """
    keys = [key for key, _ in ElaLoRALinear.SLOTS] + ["active"]
    adapter_keys = {f"{name}.{key}" for name, _ in adapter_layers(model) for key in keys}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | adapter_keys
    model.save_pretrained = SavesAdaptersToo(model)


class SavesAdaptersToo:
    """An injected transformers model's ``save_pretrained``: transformers' own save, then the adapter files
    of ``elalora.save_pretrained`` (without the allocator state: the Trainer callback adds it).

    The saver is an attribute of the model that holds the model as data, not a closure over it:
    ``copy.deepcopy`` and ``pickle`` give a copy a saver of that copy.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "save_pretrained(push_to_hub=True) of an ElaLoRA model would upload before the adapter files are "
                "written; call model.push_to_hub(repo_id) instead"
            )
        if any(fsdp.is_sharded(layer.lora_P) for _, layer in adapter_layers(model)):
            raise RuntimeError(
                "save_pretrained: the adapters are sharded (FSDP2); call elalora.save_pretrained(model, dir) on "
                "every process"
            )
        with without_adapter_flag(model):  # a quantized model's flag for the Trainer (inject)
            type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_pretrained(model, save_directory)
