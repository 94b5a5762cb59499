"""The one place that picks a backend for each op call.

* ``cpu``: CPU tensors — the C++ extension where it pays, torch ops elsewhere;
* ``triton``: CUDA tensors when Triton is installed;
* ``torch``: other devices (CUDA without Triton, MPS, ...) — every op in plain
  torch ops (the ``cpu`` backend reuses them where they pay on the CPU);
* ``reference``: the eager oracle, never chosen by itself.

``ELALORA_BACKEND=<name>`` forces one for the process (read once, at import);
:func:`set_backend` / :func:`use_backend` change it at run time. Autocast is
handled here, once, so every backend sees operands of one dtype.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "torch", "triton")
ENV_VAR = "ELALORA_BACKEND"
_PACKAGE_OF = {"reference": "reference", "cpu": "cpu", "torch": "torch_ops", "triton": "triton"}


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{name!r} is not a backend; expected one of {BACKENDS}")
    return name


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_forced: str | None = _checked(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None
# Loaded backends. Those this machine uses load now, so that torch.compile finds
# them in this dict and traces the op instead of breaking the graph on an import
# (Triton only where CUDA is, or when forced: importing it costs time).
_EAGER = ("reference", "cpu", "torch_ops") + (
    ("triton",) if _TRITON_INSTALLED and (torch.cuda.is_available() or _forced == "triton") else ()
)
_LOADED: dict[str, ModuleType] = {name: importlib.import_module(f"elalora_kernels.{name}") for name in _EAGER}


def set_backend(name: str | None) -> None:
    """Force backend ``name`` for every op, or ``None`` to choose by device again."""
    global _forced
    _forced = None if name is None else _checked(name)
    if _forced is not None:
        _load(_PACKAGE_OF[_forced])  # now, not on a first call that torch.compile may be tracing


@contextlib.contextmanager
def use_backend(name: str | None):
    """``set_backend(name)`` for the duration of a ``with`` block."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_for(device: torch.device) -> str:
    """Name of the backend that ops on tensors of ``device`` run on."""
    if _forced is not None:
        return _forced
    if device.type == "cpu":
        return "cpu"
    return "triton" if device.type == "cuda" and _TRITON_INSTALLED else "torch"


def _load(package: str) -> ModuleType:
    if package not in _LOADED:  # Triton kernels import only when first needed
        _LOADED[package] = importlib.import_module(f"elalora_kernels.{package}")
    return _LOADED[package]


def _module(device: torch.device) -> ModuleType:
    return _load(_PACKAGE_OF[backend_for(device)])


def _autocast_call(op, device_type: str, tensors: tuple, rest: tuple):
    """``op(*tensors, *rest)``; under autocast, once for every backend: cast every operand
    to the autocast dtype, as autocast casts an nn.Linear, and run the op in that dtype
    with autocast off. The casts are autograd ops, so gradients come back in the
    parameters' dtype."""
    if not torch.is_autocast_enabled(device_type):
        return op(*tensors, *rest)
    dtype = torch.get_autocast_dtype(device_type)
    tensors = tuple(t.to(dtype) if t is not None else None for t in tensors)
    with torch.autocast(device_type, enabled=False):
        return op(*tensors, *rest)


def adapter_linear(x, weight, bias, P, lam, Q, active, scale, dropout_p=0.0, rank=None):
    module = _module(x.device)
    if getattr(module, "READS_PARAMETERS_IN_ANY_DTYPE", False):  # P, λ, Q cast inside its kernels: no cast launches
        return _autocast_call(module.adapter_linear, x.device.type, (x, weight, bias),
                              (P, lam, Q, active, scale, dropout_p, rank))
    return _autocast_call(module.adapter_linear, x.device.type, (x, weight, bias, P, lam, Q),
                          (active, scale, dropout_p, rank))


def adapter_add(y0, x, P, lam, Q, active, scale, dropout_p=0.0, rank=None):
    """``y0`` plus the adapter, for a base that ran as its own module (a quantized one).

    ``rank`` and P, λ, Q as for :func:`adapter_linear`: full-size, in any float dtype; the
    adapter runs in x's dtype (the autocast dtype under autocast).
    """
    module = _module(x.device)
    if getattr(module, "READS_PARAMETERS_IN_ANY_DTYPE", False):  # full-size, cast in its kernels: no slices, no casts
        return _autocast_call(module.adapter_add, x.device.type, (y0, x), (P, lam, Q, active, scale, dropout_p, rank))
    if rank is not None:
        P, lam, Q, active = P[:, :rank], lam[:rank], Q[:rank], active[:rank]
    P, lam, Q = (t.to(x.dtype) for t in (P, lam, Q))  # autograd casts: gradients come back in the parameters' dtype
    return _autocast_call(module.adapter_add, x.device.type, (y0, x, P, lam, Q), (active, scale, dropout_p))


def score_ema_update(params, grads, ema_ipt, ema_unc, beta1, beta2) -> int:
    if not params:
        return 0
    return _module(params[0].device).score_ema_update(params, grads, ema_ipt, ema_unc, beta1, beta2)


def resident_score_ema(device: torch.device):
    """The backend's per-step score+EMA update whose state stays on the device (a class: Triton's
    ``ResidentScoreEma``), or None where the backend updates per call."""
    return getattr(_module(device), "ResidentScoreEma", None)


def rank_scores(ipt, unc):
    return _module(ipt[0][0].device).rank_scores(ipt, unc)


def orth_penalty(Ps, Qs, actives, coeff):
    return _module(Ps[0].device).orth_penalty(Ps, Qs, actives, coeff)
