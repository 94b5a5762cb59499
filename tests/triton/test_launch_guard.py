"""Every Triton launch runs under the launch guard of its tensors' device.

Triton launches on the *current* CUDA device; without the guard a model spread
over several GPUs launches kernels on the wrong one. The guard is replaced by
a recorder and every kernel launch checks that it happens inside it, entered
with the device of the op's tensors.
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

import elalora_kernels.triton as tk
from elalora_kernels.triton import _common

al = importlib.import_module("elalora_kernels.triton.adapter_linear")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal by type and resolved index: ``cuda`` is the current CUDA device (``cuda:0`` != ``cuda`` in torch)."""

    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0

    return a.type == b.type and index(a) == index(b)


def test_device_comparison_resolves_the_index():
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    assert same_device(cuda, torch.device("cuda", current)) and same_device(torch.device("cuda", current), cuda)
    assert same_device(cuda0, cuda0) and not same_device(cuda0, cuda1)
    assert same_device(cuda, cuda1) == (current == 1)
    assert not same_device(torch.device("cpu"), cuda0) and same_device(torch.device("cpu"), torch.device("cpu"))


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, device of the enclosing guard or None) for every launch."""
    inside: list[torch.device] = []
    seen: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def recording_guard(device):
        inside.append(torch.device(device))
        try:
            yield
        finally:
            inside.pop()

    kernel_type = type(al._fwd_kernel)  # JITFunction on a GPU, InterpretedFunction under the interpreter
    real_run = kernel_type.run

    def run(self, *args, **kwargs):
        seen.append((self.__name__, inside[-1] if inside else None))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(_common, "launch_guard", recording_guard)
    monkeypatch.setattr(kernel_type, "run", run)
    return seen


def test_every_launch_is_guarded_with_the_tensors_device(device, launches):
    x = torch.randn(5, 24, device=device, requires_grad=True)
    W = torch.randn(20, 24, device=device)
    P = torch.randn(20, 4, device=device, requires_grad=True)
    lam = torch.randn(4, device=device, requires_grad=True)
    Q = torch.randn(4, 24, device=device, requires_grad=True)
    active = torch.ones(4, dtype=torch.bool, device=device)
    tk.adapter_linear(x, W, None, P, lam, Q, active, 2.0).sum().backward()
    ws = [P.detach(), lam.detach(), Q.detach()]
    emas = [torch.zeros_like(w) for w in ws]
    tk.score_ema_update(ws, [P.grad, lam.grad, Q.grad], emas, [e.clone() for e in emas], 0.85, 0.85)
    tk.rank_scores([tuple(emas)], [tuple(emas)])

    names = {name for name, _ in launches}
    assert {"_fwd_kernel", "_bwd_dx_kernel", "_tn_kernel", "_score_ema_kernel", "_rank_scores_kernel"} <= names
    unguarded = [name for name, dev in launches if dev is None or not same_device(dev, device)]
    assert not unguarded, f"launched outside a guard for {device}: {unguarded}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (interpreter) side of the guard")
def test_guard_is_a_cuda_device_context_for_cuda_tensors():
    assert isinstance(_common.launch_guard(torch.device("cuda", 1)), torch.cuda.device)
    assert isinstance(_common.launch_guard(torch.device("cpu")), contextlib.nullcontext)
