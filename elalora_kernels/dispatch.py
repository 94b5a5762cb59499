"""The one place that picks a backend for each op call.

CUDA tensors go to Triton when it is installed, CPU tensors to the C++
extension (the ``cpu`` backend falls back to vectorised torch by itself when
the extension is missing). ``ELALORA_BACKEND=reference|cpu|triton`` forces one.
Autocast is handled here, once, so every backend sees operands of one dtype.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "ELALORA_BACKEND"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Loaded backends. Those this machine uses load now, so that torch.compile finds
# them in this dict and traces the op instead of breaking the graph on an import
# (Triton only where CUDA is: importing it costs time on CPU-only machines).
_EAGER = ("reference", "cpu") + (("triton",) if _TRITON_INSTALLED and torch.cuda.is_available() else ())
_LOADED: dict[str, ModuleType] = {name: importlib.import_module(f"elalora_kernels.{name}") for name in _EAGER}


def backend_for(device: torch.device) -> str:
    """Name of the backend that ops on tensors of ``device`` run on."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; expected one of {BACKENDS}")
        return forced
    if device.type == "cuda" and _TRITON_INSTALLED:
        return "triton"
    return "cpu"


def _module(device: torch.device) -> ModuleType:
    name = backend_for(device)
    if name not in _LOADED:  # Triton kernels import only when first needed
        _LOADED[name] = importlib.import_module(f"elalora_kernels.{name}")
    return _LOADED[name]


def adapter_linear(x, weight, bias, P, lam, Q, active, scale, dropout_p=0.0):
    op = _module(x.device).adapter_linear
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return op(x, weight, bias, P, lam, Q, active, scale, dropout_p)
    # Autocast, once for every backend: cast every operand to the autocast dtype, as
    # autocast casts an nn.Linear, and run the op in that dtype with autocast off.
    # The casts are autograd ops, so gradients come back in the parameters' dtype.
    dtype = torch.get_autocast_dtype(device_type)
    x, weight, bias, P, lam, Q = (t.to(dtype) if t is not None else None for t in (x, weight, bias, P, lam, Q))
    with torch.autocast(device_type, enabled=False):
        return op(x, weight, bias, P, lam, Q, active, scale, dropout_p)


def score_ema_update(params, grads, ema_ipt, ema_unc, beta1, beta2) -> int:
    if not params:
        return 0
    return _module(params[0].device).score_ema_update(params, grads, ema_ipt, ema_unc, beta1, beta2)


def rank_scores(ipt, unc):
    return _module(ipt[0][0].device).rank_scores(ipt, unc)


def orth_penalty(Ps, Qs, actives, coeff):
    return _module(Ps[0].device).orth_penalty(Ps, Qs, actives, coeff)
