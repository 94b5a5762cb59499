"""Tests of the Triton backend: on a GPU they run on CUDA; without one, under the Triton interpreter.

TRITON_INTERPRET must be set before triton.language is first imported, so the
top-level ``tests/conftest.py`` sets it for the whole session when there is no GPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the Triton backend allocates for a kernel to fill starts as NaN, and a kernel that
    falls back to torch ops (compile or launch failure) fails the test instead of passing on torch ops."""
    pytest.importorskip("triton")
    from elalora_kernels.limits import KernelFallbackWarning
    from elalora_kernels.triton import _common

    monkeypatch.setattr(_common, "POISON", True)
    monkeypatch.setattr(_common, "_FAILED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        yield
