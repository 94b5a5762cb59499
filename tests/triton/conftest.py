"""Tests of the Triton backend: on a GPU they run on CUDA; without one, under the Triton interpreter.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so
it is set here, at import time. pytest imports every conftest at collection,
so the variable is visible to the whole session; that is harmless because
nothing outside these tests imports ``elalora_kernels.triton`` on CPU
(dispatch imports it lazily, for CUDA tensors only).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the Triton backend allocates for a kernel to fill starts as NaN."""
    pytest.importorskip("triton")
    from elalora_kernels.triton import _common

    monkeypatch.setattr(_common, "POISON", True)
    yield
