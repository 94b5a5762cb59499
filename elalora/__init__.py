"""ElaLoRA: LoRA adapters whose ranks are pruned and expanded during fine-tuning.

    model = elalora.inject(model, config)                # adapt target nn.Linear layers, as PEFT's get_peft_model
    allocator = elalora.RankAllocator(model, config, optimizer)
    loss = task_loss + allocator.orth_penalty()
    ...; optimizer.step(); allocator.step(); optimizer.zero_grad()
"""
from .allocator import RankAllocator
from .config import ElaLoRAConfig
from .disable import disable_adapters
from .export import export_peft_lora
from .io import AdapterLoadError, load_adapter, save_adapter
from .layer import ElaLoRALinear, NoAllocatorWarning
from .model import adapted_names, adapter_layers, inject, merge, merge_and_unload, print_trainable_parameters, unmerge
from .pretrained import from_pretrained, save_pretrained

__all__ = [
    "AdapterLoadError",
    "export_peft_lora",
    "load_adapter",
    "save_adapter",
    "from_pretrained",
    "save_pretrained",
    "ElaLoRAConfig",
    "ElaLoRALinear",
    "disable_adapters",
    "RankAllocator",
    "NoAllocatorWarning",
    "adapted_names",
    "adapter_layers",
    "inject",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "unmerge",
]
__version__ = "0.1.0"


def __getattr__(name):
    # `elalora.integrations` needs transformers, an optional dependency: import it on first use.
    if name == "integrations":
        import importlib

        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module 'elalora' has no attribute {name!r}")
