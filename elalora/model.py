"""Whole-model operations: choose and inject adapters, find them, merge them, count parameters."""
from __future__ import annotations

import contextlib
import re
import warnings

import torch
import torch.nn as nn

from . import quantized
from .architectures import default_targets, model_type, task_heads
from .config import ElaLoRAConfig
from .layer import ElaLoRALinear, conv1d_class

CONFIG_ATTR = "elalora_config"  # inject records its config on the model under this name


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):  # a regex over the full module name, as in PEFT
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_adaptable(module: nn.Module) -> bool:
    # Exactly nn.Linear: subclasses such as MultiheadAttention's out_proj are used through their weight.
    conv1d = conv1d_class()
    return (
        type(module) is nn.Linear
        or (conv1d is not None and isinstance(module, conv1d))
        or quantized.base_kind(module) is not None
    )


def out_in_features(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an adaptable layer or an ElaLoRALinear (Conv1D stores [in, out])."""
    if isinstance(module, ElaLoRALinear) or quantized.base_kind(module) is not None:
        return module.out_features, module.in_features
    rows, cols = module.weight.shape
    conv1d = conv1d_class()
    return (cols, rows) if conv1d is not None and isinstance(module, conv1d) else (rows, cols)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers ElaLoRA can adapt: plain ``nn.Linear``, transformers' ``Conv1D``, bitsandbytes'
    ``Linear4bit`` / ``Linear8bitLt``."""
    return [n for n, m in model.named_modules() if _is_adaptable(m)]


def _describe_linears(model: nn.Module) -> str:
    names = linear_layer_names(model)
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear) or _is_adaptable(m)})
    return (
        f"the model's linear layers include {names[:6]} (their last name parts: {suffixes}; "
        f"the linear layer types found: {types})"
    )


ALL_LINEAR = "all-linear"


def resolve_targets(model: nn.Module, config: ElaLoRAConfig):
    """``config.target_modules``, or the architecture's default when it is ``None``.

    ``"all-linear"`` is every adaptable layer but the output layer (a language
    model's head, often tied to the embedding), as full names.
    """
    if config.target_modules == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [
            n for n, m in model.named_modules()
            if (_is_adaptable(m) or quantized.unsupported_reason(m)) and m is not output
        ]
    if config.target_modules is not None:
        return config.target_modules
    targets = default_targets(model)
    if targets is None:
        raise ValueError(
            f"inject: target_modules=None but the architecture {model_type(model)!r} has no default targets; "
            f"pass target_modules; {_describe_linears(model)}"
        )
    return targets


def modules_to_save_names(model: nn.Module, config: ElaLoRAConfig) -> list[str]:
    """Names of the modules trained fully and saved with the adapter (outermost matches only).

    An explicit ``modules_to_save`` entry that matches no module is an error; the
    task's default heads need only match one module between them.
    """
    explicit = config.modules_to_save
    patterns = explicit if explicit is not None else task_heads(model, config.task_type)
    if not patterns:
        return []
    names = [n for n, _ in model.named_modules() if n and _matches(n, patterns)]
    if explicit is not None:
        # a regex string is one entry; each name of a list is its own entry
        entries = [explicit] if isinstance(explicit, str) else [(name,) for name in explicit]
        for entry in entries:
            if not any(_matches(n, entry) for n in names):
                shown = entry if isinstance(entry, str) else entry[0]
                raise ValueError(f"inject: modules_to_save entry {shown!r} matches no module of the model")
    elif not names:
        raise ValueError(
            f"inject: task_type={config.task_type!r} expects a head named one of {list(patterns)}, "
            "but the model has none; pass modules_to_save"
        )
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def target_names(model: nn.Module, config: ElaLoRAConfig) -> list[str]:
    """Names of the layers of ``model`` that ``config`` adapts, in model order.

    Layers inside a ``modules_to_save`` module are left out: that module trains fully.
    """
    targets = resolve_targets(model, config)
    saved = modules_to_save_names(model, config)
    for name, module in model.named_modules():
        reason = quantized.unsupported_reason(module) if _matches(name, targets) else None
        if reason:
            raise TypeError(f"inject: layer {name!r} matches target_modules but {reason}")
    return [
        n for n in linear_layer_names(model)
        if _matches(n, targets) and not any(n == s or n.startswith(s + ".") for s in saved)
    ]


def inject(model: nn.Module, config: ElaLoRAConfig) -> nn.Module:
    """Replace every target ``nn.Linear`` / ``Conv1D`` of ``model`` by an ElaLoRALinear, in place.

    Targets match a module's full name exactly or by its last dotted parts
    (``"query"`` matches ``encoder.layer.0.attention.self.query``); a string
    ``target_modules`` is a regex over the full name; ``None`` takes the
    architecture's defaults. Every parameter is frozen except the adapters'
    P, λ, Q and the ``modules_to_save`` modules (by default the head that
    ``task_type`` adds). All checks run before the model is changed. Returns
    ``model`` (``adapted_names(model)`` lists what was adapted). Adapter
    initialisation draws from a generator seeded with ``config.seed``. The
    config is kept as ``model.elalora_config`` for ``save_pretrained``; a
    transformers model's own ``save_pretrained`` then writes the adapter files
    too (``elalora.pretrained.save_through_transformers``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject expects an nn.Module as model, got {type(model).__name__}")
    if not isinstance(config, ElaLoRAConfig):
        raise TypeError(f"inject expects an ElaLoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, ElaLoRALinear) for m in model.modules()):
        raise ValueError("inject: model already holds ElaLoRA adapters")
    names = target_names(model, config)
    if not names:
        raise ValueError(
            f"inject: target_modules={resolve_targets(model, config)!r} matched no nn.Linear or Conv1D layer; "
            f"{_describe_linears(model)}"
        )
    saved = modules_to_save_names(model, config)
    for name in saved:
        module = model.get_submodule(name)
        if not all(p.is_floating_point() for p in module.parameters()):
            raise ValueError(
                f"inject: module {name!r} ({type(module).__name__}) is to be trained fully (modules_to_save) but its "
                f"weights are quantized; load the model with BitsAndBytesConfig(..., llm_int8_skip_modules="
                f"[{name.rpartition('.')[2]!r}]) so that it stays in floating point"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
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
            init=config.init,
        )
        setattr(parent, child, layer)
    keep_inputs_differentiable(model)
    quantized.keep_trainable_layout(model)
    if getattr(model, "is_quantized", False):
        # transformers.Trainer refuses a quantized model unless it carries adapters, which this flag says
        # (transformers.trainer_utils.validate_quantization_for_training); PEFT's load_adapter sets it too.
        # transformers' own save_pretrained reads it too: run that under ``without_adapter_flag``.
        model._hf_peft_config_loaded = True
    setattr(model, CONFIG_ATTR, config)
    if hasattr(model, "save_pretrained"):  # a transformers model: its own save must write the adapters too
        from .pretrained import save_through_transformers  # (pretrained imports this module)

        save_through_transformers(model)
    return model


@contextlib.contextmanager
def without_adapter_flag(model: nn.Module):
    """transformers' own ``save_pretrained`` of an adapted quantized model, with inject's adapter flag off.

    With the flag on, transformers takes the model for one its PEFT integration loaded and saves through a
    PEFT config the model does not have; with it off it writes its full (quantized) save, as for a float model.
    """
    flag = model.__dict__.pop("_hf_peft_config_loaded", None)
    try:
        yield model
    finally:
        if flag is not None:
            model._hf_peft_config_loaded = flag


def keep_inputs_differentiable(model: nn.Module) -> None:
    """Under gradient checkpointing, make a frozen embedding's output require grad (once), as PEFT does.

    Reentrant checkpointing of a block whose inputs need no gradient returns
    outputs that need none, so the adapters inside would get no gradient.
    """
    if (
        _is_checkpointing(model)
        and hasattr(model, "enable_input_require_grads")
        and getattr(model, "_require_grads_hook", None) is None
    ):
        model.enable_input_require_grads()


def _is_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has activation (gradient) checkpointing on (renamed in transformers 5)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def adapter_layers(model: nn.Module) -> list[tuple[str, ElaLoRALinear]]:
    """The (name, layer) pairs of every ElaLoRALinear in ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ElaLoRALinear)]


def adapted_names(model: nn.Module) -> list[str]:
    """The names of the adapted layers, in model order."""
    return [n for n, _ in adapter_layers(model)]


def merge(model: nn.Module) -> None:
    """Fold every adapter into its frozen weight (inference); a quantized base raises before anything merges."""
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in sorted(layers, key=lambda l: l.quantization is None):  # a quantized one first: it raises
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _plain_module(layer: ElaLoRALinear) -> nn.Module:
    """The ``nn.Linear`` / ``Conv1D`` that ``layer`` wrapped, holding ``layer``'s (merged) Parameters."""
    with torch.device("meta"):  # built without allocating: its Parameters are replaced right away
        if layer.fan_in_fan_out:
            plain = conv1d_class()(layer.out_features, layer.in_features)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain


QUANTIZED_MERGES = ("requantize", "dequantize")


def merge_and_unload(model: nn.Module, *, quantized_base: str | None = None) -> nn.Module:
    """Fold every adapter into its weight and put the plain base layer back; returns ``model``.

    The result has no ElaLoRA modules: ``model.save_pretrained`` of a Hugging
    Face model then loads with plain ``transformers``. Layers merged already
    (``elalora.merge``) are unloaded as they are. ``modules_to_save`` keep their
    trained weights.

    A quantized (bitsandbytes) base cannot hold ``W0 + ΔW`` exactly, so the
    caller chooses: ``quantized_base="requantize"`` dequantizes ``W0``, adds
    ``ΔW`` and quantizes the sum again as the base was (PEFT's merge; the
    rounding is stated in :func:`elalora.quantized.requantized` and a warning
    reports how large it was relative to ``ΔW``); ``"dequantize"`` gives plain
    float ``nn.Linear`` layers holding ``W0 + ΔW`` exactly (in the bias's dtype)
    and, for a transformers model, dequantizes the rest of it too. Without a
    choice a model with a quantized base raises and is left unchanged.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("merge_and_unload: model has no ElaLoRA adapters")
    if quantized_base not in (None, *QUANTIZED_MERGES):
        raise ValueError(f"merge_and_unload: quantized_base must be one of {QUANTIZED_MERGES} (got {quantized_base!r})")
    first_quantized = next(((n, l) for n, l in layers if l.quantization is not None), None)
    if first_quantized is not None and quantized_base is None:
        name, layer = first_quantized
        raise ValueError(
            f"merge_and_unload: layer {name!r} has a quantized base ({layer.quantization}), which cannot hold "
            "W0 + ΔW exactly; pass quantized_base=\"requantize\" (quantize the sum again, rounding it, as PEFT "
            "does) or quantized_base=\"dequantize\" (a float model); the model is unchanged"
        )
    rounding = []
    for name, layer in layers:
        if layer.quantization is not None:
            plain = _merged_quantized(layer, quantized_base, rounding)
        else:
            if not layer.merged:
                layer.merge()
            plain = _plain_module(layer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    if rounding:
        warnings.warn(
            f"merge_and_unload: re-quantizing W0 + ΔW rounded it: the rounding error is up to {max(rounding):.3g} "
            "times ΔW (Frobenius norms, per layer); pass quantized_base=\"dequantize\" to keep the merge exact",
            stacklevel=2,
        )
    if quantized_base == "dequantize" and getattr(model, "hf_quantizer", None) is not None:
        quantized.unpack_cpu_weights(model)
        model.dequantize()  # transformers: the other quantized layers, and the model's quantization flags
    model.__dict__.pop("_hf_peft_config_loaded", None)  # set by inject: the model carries no adapters now
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    model.__dict__.pop("save_pretrained", None)  # inject's: the merged model saves as a plain one
    return model


@torch.no_grad()
def _merged_quantized(layer: ElaLoRALinear, how: str, rounding: list) -> nn.Module:
    """The base of ``layer`` holding ``W0 + ΔW``, quantized again or as a float ``nn.Linear``."""
    delta = layer.delta_weight()
    weight = quantized.dequantized_weight(layer.base_layer) + delta
    if how == "dequantize":
        return quantized.float_linear(layer.base_layer, weight)
    base = quantized.requantized(layer.base_layer, weight)
    rounding.append(float((quantized.dequantized_weight(base) - weight).norm() / delta.norm().clamp_min(1e-30)))
    return base


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts as LoRA users compare them, with the idle slots apart.

    ``trainable`` and ``total`` count the adapters at their active ranks (``P``
    columns, ``λ`` entries and ``Q`` rows in use) plus everything else;
    ``spare`` is the allocated slots beyond the active ranks (up to ``r_max``):
    they train only once a round activates them, yet an optimizer such as Adam
    keeps state for them from the first step.
    """
    layers = [layer for _, layer in adapter_layers(model)]
    slot_ids = {id(p) for l in layers for p in l.slot_params()}
    others = [p for p in model.parameters() if id(p) not in slot_ids]
    active = sum(l.active_rank * (l.in_features + l.out_features + 1) for l in layers)
    capacity = sum(l.r_max * (l.in_features + l.out_features + 1) for l in layers)
    trains = any(p.requires_grad for l in layers for p in l.slot_params())
    return {
        "trainable": (active if trains else 0) + sum(p.numel() for p in others if p.requires_grad),
        "total": active + sum(quantized.parameter_count(p) for p in others),
        "adapter_active": active,
        "spare": capacity - active,
    }


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable parameters (adapters at their active ranks), then the spare slots apart."""
    c = parameter_counts(model)
    print(
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
        f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f}"
    )
    print(
        f"ElaLoRA spare slots (allocated up to r_max, not counted above): {c['spare']:,} params "
        f"|| their optimizer state with Adam: {2 * c['spare']:,} values"
    )
