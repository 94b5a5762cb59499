"""The plain-CUDA score+EMA kernel (csrc/cuda/score_ema.cu, ``elalora_kernels._C_cuda``, built when torch has
CUDA and nvcc is found) as an alternative to the Triton one, on the same launch tables.

It runs instead of the Triton kernel when ``ELALORA_SCORE_EMA=cuda``: ``benchmarks/gpu.py`` times both, so
that the faster one can be made the default from a measurement.
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cuda/score_ema.h


def extension():
    """``elalora_kernels._C_cuda`` if it was built, else None."""
    try:
        return importlib.import_module("elalora_kernels._C_cuda")
    except ImportError:
        return None


def selected(device: torch.device) -> bool:
    """Whether launches on ``device`` go to this kernel."""
    return device.type == "cuda" and os.environ.get("ELALORA_SCORE_EMA", "triton") == "cuda" and extension() is not None


def launch(tables, count: Tensor, beta1: float, beta2: float) -> None:
    extension().score_ema_launch(  # the binding guards the device itself
        tables.ptrs, tables.numels, tables.blocks, count, _DTYPE_CODE[tables.w_dtype], _DTYPE_CODE[tables.g_dtype],
        tables.aligned, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
    )
