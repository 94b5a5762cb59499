"""Quantized bases (QLoRA): bitsandbytes ``Linear4bit`` (NF4, FP4) and ``Linear8bitLt``.

Everything that knows bitsandbytes lives here. It is never imported by
``import elalora``: a model holding a bitsandbytes layer has imported
bitsandbytes already, so :func:`base_kind` only looks it up in
``sys.modules`` and elalora works without bitsandbytes installed.

A quantized base runs as its own module (bitsandbytes computes ``y0`` and
dequantises as it likes); the adapter op adds into its output in the base's
compute dtype. The base stays quantized and frozen. Merging into a quantized
base rounds (see :func:`requantized`), so it is only done on request.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
from torch import Tensor

INSTALL_HINT = 'pip install "elalora[bnb]" (bitsandbytes >= 0.50, which runs on CPU too)'
SUPPORTED = "bitsandbytes Linear4bit (NF4/FP4) and Linear8bitLt (int8 weights)"


def _bnb_nn():
    return sys.modules.get("bitsandbytes.nn")


def require_bitsandbytes(what: str):
    """``bitsandbytes``, or an ImportError that says what to install."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"{what} needs bitsandbytes: {INSTALL_HINT}") from None
    return bitsandbytes


def base_kind(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a supported bitsandbytes layer, else ``None``."""
    bnb_nn = _bnb_nn()
    if bnb_nn is None:
        return None
    if isinstance(module, bnb_nn.Linear4bit):
        return module.weight.quant_type
    if isinstance(module, bnb_nn.Linear8bitLt) and not module.state.has_fp16_weights:
        return "int8"
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` looks like a quantized linear layer that ElaLoRA cannot adapt, or ``None``.

    A subclass of ``nn.Linear`` from bitsandbytes that :func:`base_kind` does not
    know, or one whose weight is not floating point (some other quantization).
    """
    if not isinstance(module, nn.Linear) or base_kind(module) is not None:
        return None
    bnb_nn = _bnb_nn()
    if bnb_nn is not None and isinstance(module, bnb_nn.Linear8bitLt):
        return "a Linear8bitLt with has_fp16_weights=True keeps a trainable float weight, not a frozen quantized one"
    weight = getattr(module, "weight", None)
    if type(module).__module__.startswith("bitsandbytes") or (
        isinstance(weight, Tensor) and not weight.is_floating_point()
    ):
        return f"{type(module).__name__} is a quantized layer type ElaLoRA does not adapt (it adapts {SUPPORTED})"
    return None


def parameter_count(p: Tensor) -> int:
    """How many weights ``p`` holds: a packed 4-bit weight stores two in each byte of its storage."""
    bnb_nn = _bnb_nn()
    if bnb_nn is not None and isinstance(p, bnb_nn.Params4bit):
        return p.numel() * 2 * p.element_size()
    return p.numel()


def quantization_config(model: nn.Module) -> dict | None:
    """A transformers model's ``config.quantization_config`` as JSON data (``None`` for a float model)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config.to_dict() if hasattr(config, "to_dict") else config


def compute_dtype(base: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype bitsandbytes computes ``base(x)`` in: a Linear4bit's set compute dtype, else the input's."""
    dtype = getattr(base, "compute_dtype", None)
    return dtype if dtype is not None and getattr(base, "compute_type_is_set", False) else x.dtype


@torch.no_grad()
def dequantized_weight(base: nn.Module) -> Tensor:
    """``W0`` of a supported bitsandbytes layer as a float32 ``[out, in]`` tensor (a new tensor)."""
    import bitsandbytes.functional as bnb_f

    weight = base.weight
    if base_kind(base) == "int8":
        # the row scales move from the weight to the layer's state at its first forward
        scales = weight.SCB if weight.SCB is not None else base.state.SCB
        return bnb_f.int8_vectorwise_dequant(weight.data, scales).float()
    unpack_cpu_weights(base)
    return bnb_f.dequantize_4bit(weight.data, weight.quant_state).float()


def unpack_cpu_weights(model: nn.Module) -> None:
    """Put every 4-bit weight of ``model`` back in bitsandbytes' standard layout, in place.

    bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the
    first no-grad eval forward, and ``dequantize_4bit`` (transformers'
    ``model.dequantize()`` too) reads the standard layout only: on a repacked
    weight it returns wrong values. bitsandbytes' own save unpacks the same way;
    its next such forward packs again.
    """
    import bitsandbytes.functional as bnb_f

    bnb_nn = _bnb_nn()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb_nn.Linear4bit) and getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = bnb_f._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )


def keep_trainable_layout(model: nn.Module) -> None:
    """Keep every 4-bit weight of ``model`` in the layout bitsandbytes can train through, in place.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight
    for an inference kernel at its first no-grad eval forward, and a training
    forward on the repacked weight fails (``a view of a leaf Variable that
    requires grad ...``): every evaluation in the middle of a fine-tune would
    break the next step. The repack is switched off on every 4-bit layer of the
    model, adapted or not (the price: 4-bit inference on CPU takes bitsandbytes'
    training path), and weights already repacked go back to the standard layout.
    """
    bnb_nn = _bnb_nn()
    if bnb_nn is None:
        return
    unpack_cpu_weights(model)
    for module in model.modules():
        if isinstance(module, bnb_nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def base_dtype(base: nn.Module) -> torch.dtype:
    """The float dtype a dequantised copy of ``base`` takes: its bias's, else its compute dtype, else float32."""
    if base.bias is not None:
        return base.bias.dtype
    return getattr(base, "compute_dtype", None) or torch.float32


@torch.no_grad()
def requantized(base: nn.Module, weight: Tensor) -> nn.Module:
    """``base`` with its weight replaced by ``weight`` quantized exactly as ``base`` was (PEFT's merge).

    Rounding: a 4-bit weight is rounded to the nearest of its 16 NF4/FP4 levels
    scaled by the absmax of its block of ``blocksize`` values (64 by default);
    an int8 weight to the nearest multiple of its row's absmax / 127. A weight
    change smaller than half a step is lost.
    """
    bnb = require_bitsandbytes("merging into a quantized base")
    old = base.weight
    device = old.device
    if base_kind(base) == "int8":
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
        ).to(device)
        base.state.reset_grads()
        return base
    new = bnb.nn.Params4bit(
        weight.to("cpu", base_dtype(base)),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=base,
    )
    base.weight = new.to(device)  # moving a not-yet-quantized Params4bit quantizes it, on CPU too
    return base


def float_linear(base: nn.Module, weight: Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` and ``base``'s bias, in :func:`base_dtype`."""
    dtype = base_dtype(base)
    with torch.device("meta"):
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return linear
