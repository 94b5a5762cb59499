"""ElaLoRALinear: a drop-in nn.Linear with an elastic-rank SVD-form adapter."""
from __future__ import annotations

import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import elalora_kernels

from . import quantized
from ._checks import is_int
from .config import check_adapter_options, resolve_r_max


class NoAllocatorWarning(UserWarning):
    """ElaLoRA adapters train without a RankAllocator: their ranks stay fixed and no penalty is added."""


_warned_no_allocator = False


@torch.compiler.disable
def _warn_no_allocator(grad=None) -> None:
    """A backward hook: the first gradient that reaches an adapter without an allocator warns."""
    global _warned_no_allocator
    if _warned_no_allocator:
        return
    _warned_no_allocator = True
    warnings.warn(
        "ElaLoRA adapters are training without a RankAllocator, so their ranks stay fixed and no orthogonality "
        "penalty is added. Create elalora.RankAllocator(model, config, optimizer) and call allocator.step() after "
        "every optimizer.step() (and add allocator.orth_penalty() to the loss), or attach "
        "elalora.integrations.ElaLoRACallback(config) to the transformers Trainer. To train fixed ranks on "
        "purpose, silence elalora.NoAllocatorWarning.",
        NoAllocatorWarning,
    )


def conv1d_class():
    """``transformers.pytorch_utils.Conv1D`` if transformers is loaded, else ``None``.

    A model holding a Conv1D has imported transformers already, so this never
    imports it (transformers stays optional and ``import elalora`` stays fast).
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


class ElaLoRALinear(nn.Module):
    """``y = x W0ᵀ + bias + s·((dropout(x) Qᵀ) ⊙ λ) Pᵀ`` with elastic rank.

    Capacity is static: ``lora_P [out, r_max]``, ``lora_lam [r_max]`` and
    ``lora_Q [r_max, in]`` are allocated once, so optimizers, DDP and
    ``torch.compile`` never see a shape change. The boolean buffer ``active``
    says which slots are in use; the allocator keeps active slots packed at the
    front, so eager forward reads only the first ``active_rank`` slots and the
    adapter costs what its active rank costs. ``W0`` and ``bias`` are frozen.

    Wrapping a GPT-2 style ``Conv1D`` (weight stored ``[in, out]``) keeps that
    weight as it is (``fan_in_fan_out``) and hands the kernels its transpose.
    Wrapping a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` keeps it whole as
    ``base_layer``: it computes ``y0`` itself and the adapter op adds into it
    (``elalora.quantized``); the adapter's Parameters are float32.
    """

    fan_in_fan_out = False  # True when ``weight`` is stored [in, out], as in transformers' Conv1D
    adapter_enabled = True  # False inside ``elalora.disable_adapters``: the layer computes its base alone
    quantization = None  # "nf4" / "fp4" / "int8" when the base is a bitsandbytes layer held as ``base_layer``
    # The slot tensors, each with the axis that indexes its slots: P [out, r_max], λ [r_max], Q [r_max, in].
    # Saves, exports, the allocator's moves of optimizer state and FSDP2 all read them from here.
    SLOTS = (("lora_P", 1), ("lora_lam", 0), ("lora_Q", 0))

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        r_max: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        init: str = "zero_p",
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not all(is_int(n) and n >= 1 for n in (in_features, out_features)):
            raise ValueError(
                "ElaLoRALinear: in_features and out_features must be ints >= 1 "
                f"(got {in_features!r}, {out_features!r})"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"ElaLoRALinear: dtype must be a floating point dtype (got {dtype!r})")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, r_max, lora_alpha, lora_dropout, generator, init)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        r_max: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        generator: torch.Generator | None = None,
        init: str = "zero_p",
    ) -> "ElaLoRALinear":
        """Wrap an ``nn.Linear``, a transformers ``Conv1D`` or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

        The base's weight and bias Parameters are shared, not copied.
        """
        conv1d = conv1d_class()
        is_conv1d = conv1d is not None and isinstance(linear, conv1d)
        quantization = quantized.base_kind(linear)
        reason = quantized.unsupported_reason(linear)
        if reason or not (isinstance(linear, nn.Linear) or is_conv1d):
            raise TypeError(
                f"from_linear expects an nn.Linear, transformers' Conv1D or {quantized.SUPPORTED}, "
                f"got {type(linear).__name__}" + (f" ({reason})" if reason else "")
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.fan_in_fan_out = is_conv1d
        if quantization is not None:
            layer.quantization = quantization
            layer.base_layer = linear
        layer._setup(linear.weight, linear.bias, r, r_max, lora_alpha, lora_dropout, generator, init)
        return layer

    def _setup(self, weight, bias, r, r_max, lora_alpha, lora_dropout, generator, init) -> None:
        r_max = resolve_r_max(r, r_max, "ElaLoRALinear: ")
        check_adapter_options(lora_alpha, lora_dropout, init, "ElaLoRALinear: ")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"ElaLoRALinear: generator must be a torch.Generator or None (got {type(generator).__name__})"
            )
        if self.quantization is None and not weight.is_floating_point():
            raise TypeError(f"ElaLoRALinear: weight must be floating point (got {weight.dtype})")
        if self.quantization is not None:  # a packed 4-bit weight's shape is not [out, in]
            out_features, in_features = self.base_layer.out_features, self.base_layer.in_features
        else:
            out_features, in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.r_init, self.r_max = r, r_max
        self.scale = lora_alpha / r  # fixed: not rescaled when the rank changes (docs/ALGORITHM.md §1)
        self.lora_dropout = float(lora_dropout)
        if self.quantization is None:  # a quantized base keeps its own Parameters in ``base_layer``
            self.weight = weight
            self.bias = bias
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": weight.dtype if self.quantization is None else torch.float32}
        # Drawn on the CPU in float32 so a seed gives the same adapter on every device.
        # Both inits draw the same random numbers, so a seed gives the same Q under either.
        # ΔW = 0 under both: "paper" (docs/ALGORITHM.md §1) has λ = 0, "zero_p" has P = 0 (as LoRA's B = 0).
        # Only the r active slots are drawn: a round initialises a slot anew when it activates it (§4.6),
        # so r_max reserves memory without changing what a seed draws.
        p = torch.zeros(out_features, r_max)
        q = torch.zeros(r_max, in_features)
        p[:, :r] = torch.randn(out_features, r, generator=generator) * 0.02
        q[:r] = torch.randn(r, in_features, generator=generator) * 0.02
        lam = torch.zeros(r_max)
        if init == "zero_p":
            p.zero_()
            lam.fill_(1.0)
        self.lora_P = nn.Parameter(p.to(**factory))
        self.lora_lam = nn.Parameter(lam.to(**factory))
        self.lora_Q = nn.Parameter(q.to(**factory))
        active = torch.zeros(r_max, dtype=torch.bool, device=weight.device)
        active[:r] = True
        self.register_buffer("active", active, persistent=True)
        self._rank = r  # host copy of active.sum(): forward must not sync on it
        self.merged = False
        self.has_allocator = False  # set by RankAllocator: training without one warns once
        self.register_load_state_dict_post_hook(_refresh_rank_after_load)

    def slot_params(self) -> tuple[nn.Parameter, ...]:
        """P, λ, Q: the Parameters named in ``SLOTS``, in that order."""
        return tuple(getattr(self, name) for name, _ in self.SLOTS)

    @staticmethod
    def slot_shapes(out_features: int, in_features: int, r_max: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of ``SLOTS`` in a layer of these sizes."""
        return {"lora_P": (out_features, r_max), "lora_lam": (r_max,), "lora_Q": (r_max, in_features)}

    @property
    def base_weight(self) -> Tensor:
        """``W0`` as ``[out, in]`` (a transposed view of a Conv1D weight: writes reach the Parameter)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def base_bias(self) -> Tensor | None:
        return self.base_layer.bias if self.quantization is not None else self.bias

    # ----------------------------------------------------------------- rank
    @property
    def active_rank(self) -> int:
        return self._rank

    def set_active_rank(self, rank: int) -> None:
        """Mark slots ``[0, rank)`` active (the allocator keeps them packed)."""
        if not (is_int(rank) and 1 <= rank <= self.r_max):
            raise ValueError(f"active rank must be an int in [1, {self.r_max}] (got {rank!r})")
        with torch.no_grad():
            self.active.zero_()
            self.active[:rank] = True
        self._rank = rank

    # -------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.adapter_enabled:  # a Python attribute: torch.compile guards on it (one graph per state)
            return self.base_layer(x) if self.quantization is not None else F.linear(x, self.base_weight, self.bias)
        if self.merged:
            return F.linear(x, self.base_weight, self.bias)
        # Under torch.compile use every slot with the mask, so that a change of
        # rank changes a buffer's values, not a shape (no recompilation).
        r = self.r_max if torch.compiler.is_compiling() else self._rank
        if self.quantization is not None:  # y0 = base(x), then the adapter op adds in
            out = self._add_adapter(self.base_layer(x), x, r)
        else:
            out = elalora_kernels.adapter_linear(x, self.base_weight, self.bias, *self._adapter_operands(), rank=r)
        # Eager only, and tested first: a tensor hook inside a compiled graph would break fullgraph=True, and a
        # compiled forward that read the flag would be guarded on it and recompile once the warning had fired.
        if not torch.compiler.is_compiling() and self.training and not self.has_allocator and not _warned_no_allocator:
            if self.lora_lam.requires_grad and out.requires_grad:
                out.register_hook(_warn_no_allocator)
        return out

    def _adapter_operands(self) -> tuple:
        """(P, λ, Q, active, scale, dropout p) for either kernel entry point: full-size float32 slots, with the
        rank passed as a number beside them, so that nothing is sliced on the autograd path; the dispatch layer
        casts and slices where its backend needs it, the Triton kernels need neither."""
        return (self.lora_P, self.lora_lam, self.lora_Q, self.active, self.scale,
                self.lora_dropout if self.training else 0.0)

    def _add_adapter(self, y0: Tensor, x: Tensor, r: int) -> Tensor:
        """``y0`` (a quantized base's output) plus the adapter, computed in the base's compute dtype."""
        dtype = quantized.compute_dtype(self.base_layer, x)
        out = elalora_kernels.adapter_add(y0.to(dtype), x.to(dtype), *self._adapter_operands(), rank=r)
        # bitsandbytes returns the input's dtype; under autocast the autocast dtype stands, as for nn.Linear
        return out if torch.is_autocast_enabled(x.device.type) else out.to(y0.dtype)

    def _check_input(self, x) -> None:
        """Reject what F.linear would reject with a cryptic message (or silently accept)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"ElaLoRALinear: input must be a torch.Tensor (got {type(x).__name__})")
        if not x.is_floating_point():
            raise TypeError(f"ElaLoRALinear: input must be a floating point tensor (got {x.dtype})")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"ElaLoRALinear: input's last dimension must be in_features = {self.in_features} "
                f"(got shape {tuple(x.shape)})"
            )
        if x.device != self.lora_P.device:
            raise ValueError(f"ElaLoRALinear: input is on {x.device} but the layer is on {self.lora_P.device}")
        if self.quantization is not None:  # bitsandbytes casts any float input to its compute dtype
            return
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"ElaLoRALinear: input dtype {x.dtype} does not match the layer's {self.weight.dtype} "
                "(cast the input, or run under torch.autocast for mixed precision)"
            )

    # ---------------------------------------------------------------- merge
    def delta_weight(self) -> Tensor:
        """``ΔW = s·P diag(λ·active) Q``, computed in float32, in the weight's dtype (a quantized base: float32)."""
        r = self._rank
        lam = self.lora_lam[:r].float() * self.active[:r].float()
        delta = (self.lora_P[:, :r].float() * (self.scale * lam)) @ self.lora_Q[:r].float()
        return delta if self.quantization is not None else delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into W0 for inference; ranks must not change while merged."""
        if self.merged:
            raise RuntimeError("ElaLoRALinear.merge: layer is already merged")
        if self.quantization is not None:
            raise RuntimeError(
                f"ElaLoRALinear.merge: the base is quantized ({self.quantization}): folding ΔW in would round it to "
                "the quantization grid and could not be undone exactly; use elalora.merge_and_unload(model, "
                'quantized_base="requantize") (as PEFT does, rounding) or quantized_base="dequantize" (a float model)'
            )
        self.base_weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("ElaLoRALinear.unmerge: layer is not merged")
        self.base_weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.base_bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, rank={self._rank}/{self.r_max}, "
            f"scale={self.scale:g}, dropout={self.lora_dropout:g}, merged={self.merged}"
            + (f", quantization={self.quantization}" if self.quantization is not None else "")
        )


def _refresh_rank_after_load(layer: ElaLoRALinear, incompatible_keys) -> None:
    """Re-derive the host rank from a loaded ``active`` buffer, which must be a prefix."""
    active = layer.active.cpu()
    rank = int(active.sum())
    if rank < 1 or not bool(active[:rank].all()):
        raise ValueError(
            f"loaded 'active' buffer is not a packed prefix of >= 1 slots: {active.int().tolist()}"
        )
    layer._rank = rank

