"""The CUDA C++ score+EMA kernel (csrc/cuda/score_ema.cu, ``elalora_kernels._C_cuda``) against
reference.score_ema_update, bit for bit, on CUDA: the allocator's resident update with ELALORA_SCORE_EMA=cuda.

Runs where the extension was built (a CUDA machine after ``make gpu-check`` or an install with nvcc);
skipped elsewhere. tests/triton/test_cuda_source.py compiles the source to PTX wherever nvcc exists."""
from __future__ import annotations

import importlib

import pytest
import torch

from elalora.allocator import flat_emas
from elalora_kernels import reference

cuda_score_ema = importlib.import_module("elalora_kernels.triton.cuda_score_ema")
resident = importlib.import_module("elalora_kernels.triton.resident_score_ema")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_score_ema.extension() is None,
    reason="needs CUDA and the built extension elalora_kernels._C_cuda",
)

# full 4096-element chunks, tails, tiny tensors, odd sizes
SHAPES = [(67, 5), (5,), (5, 200), (1,), (4096, 2), (3, 4097), (123, 7)]


def _set(dtype, aligned: bool, seed=0):
    """Weights, gradients (three non-finite) and float32 EMA views, 16-byte aligned (the allocator's
    layout, flat_emas) or at an odd offset (the kernel's scalar path)."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen).to("cuda", dtype) for s in SHAPES]
    gs = [torch.randn(s, generator=gen).to("cuda", dtype) for s in SHAPES]
    gs[0][3, 2], gs[2][1, 7], gs[4][4095, 1] = float("inf"), float("nan"), float("-inf")
    if aligned:
        (flat_i, vi), (flat_u, vu) = flat_emas(ws, torch.device("cuda")), flat_emas(ws, torch.device("cuda"))
    else:
        total = sum(w.numel() for w in ws)
        flat_i, flat_u = (torch.empty(total + 1, device="cuda")[1:] for _ in range(2))
        vi, vu, at = [], [], 0
        for w in ws:
            vi.append(flat_i[at:at + w.numel()].view(w.shape))
            vu.append(flat_u[at:at + w.numel()].view(w.shape))
            at += w.numel()
    flat_i.copy_(torch.rand(flat_i.shape, generator=gen))
    flat_u.copy_(torch.rand(flat_u.shape, generator=gen))
    return ws, gs, vi, vu


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_is_bit_identical_to_the_reference(monkeypatch, dtype, aligned):
    monkeypatch.setenv("ELALORA_SCORE_EMA", "cuda")
    ws, gs, vi, vu = _set(dtype, aligned)
    ri, ru = [t.clone() for t in vi], [t.clone() for t in vu]
    expected = reference.score_ema_update(ws, gs, ri, ru, 0.85, 0.91)
    ema = resident.ResidentScoreEma(vi, vu)
    ema.update(ws, gs, 0.85, 0.91)
    assert ema.aligned == aligned
    assert ema.read_count() == expected == 3
    for k, (a, b) in enumerate(zip(ri + ru, vi + vu)):
        assert torch.equal(a, b), f"EMA {k} differs"


def test_cuda_kernel_repeated_steps_match(monkeypatch):
    """Three steps with new gradients: the EMAs stay bit-identical (the pointer table is refreshed)."""
    monkeypatch.setenv("ELALORA_SCORE_EMA", "cuda")
    ws, gs, vi, vu = _set(torch.bfloat16, aligned=True, seed=1)
    ri, ru = [t.clone() for t in vi], [t.clone() for t in vu]
    ema = resident.ResidentScoreEma(vi, vu)
    for _ in range(3):
        gs = [torch.randn_like(g) for g in gs]
        reference.score_ema_update(ws, gs, ri, ru, 0.85, 0.85)
        ema.update(ws, gs, 0.85, 0.85)
    assert all(torch.equal(a, b) for a, b in zip(ri + ru, vi + vu))
