"""Triton score+EMA (one launch for every tensor) against reference.score_ema_update: bit for bit."""
from __future__ import annotations

import importlib

import pytest
import torch

from elalora_kernels import reference

triton_backend = pytest.importorskip("elalora_kernels.triton")
tables = importlib.import_module("elalora_kernels.triton.score_ema_tables")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/nan under the interpreter

SHAPES = [(67, 5), (5,), (5, 200), (1,), (4096, 2), (3, 4097)]  # full blocks, tails, tiny tensors


def _tensors(device, dtype, shapes=SHAPES, seed=0, nonfinite=True):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    if nonfinite:
        gs[0][3, 2] = float("inf")
        gs[2][1, 7] = float("nan")
        gs[4][4095, 1] = float("-inf")
    ipt = [torch.rand(s, generator=gen).to(device) for s in shapes]
    unc = [torch.rand(s, generator=gen).to(device) for s in shapes]
    return ws, gs, ipt, unc


def _both(ws, gs, ipt, unc, beta1=0.85, beta2=0.85):
    i_ref, u_ref = [t.clone() for t in ipt], [t.clone() for t in unc]
    n_ref = reference.score_ema_update(ws, gs, i_ref, u_ref, beta1, beta2)
    n_fast = triton_backend.score_ema_update(ws, gs, ipt, unc, beta1, beta2)
    assert n_fast == n_ref
    for a, b in zip(i_ref + u_ref, ipt + unc):
        assert torch.equal(a, b)  # bit for bit, NaN-free by construction
    return n_fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_exact_with_nonfinite_guard(device, dtype):
    ws, gs, ipt, unc = _tensors(device, dtype)
    assert _both(ws, gs, ipt, unc) == 3


def test_odd_betas_and_repeated_steps(device):
    ws, gs, ipt, unc = _tensors(device, torch.float32, nonfinite=False)
    for step in range(3):
        gs = [torch.randn_like(g) for g in gs]
        assert _both(ws, gs, ipt, unc, beta1=0.7, beta2=0.91) == 0


def test_flat_buffer_views_misaligned(device):
    """The allocator's layout: EMAs are views into two flat float32 buffers, at odd offsets."""
    shapes = [(7, 3), (3,), (3, 11), (1, 5)]
    ws, gs, _, _ = _tensors(device, torch.bfloat16, shapes, nonfinite=False)
    total = sum(torch.Size(s).numel() for s in shapes)
    flat_i = torch.rand(total + 1, device=device)[1:]  # offset by one element: not 16-byte aligned
    flat_u = torch.rand(total + 1, device=device)[1:]
    views_i, views_u, off = [], [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        views_i.append(flat_i[off : off + n].view(s))
        views_u.append(flat_u[off : off + n].view(s))
        off += n
    _both(ws, gs, views_i, views_u)


def test_mixed_dtypes_and_noncontiguous(device):
    ws, gs, ipt, unc = _tensors(device, torch.float32, nonfinite=False)
    ws[1], gs[1] = ws[1].half(), gs[1].half()  # a second dtype group: a second launch
    big = torch.randn(9, 14, device=device)
    ws.append(big[:, ::2])  # non-contiguous: takes the reference path
    gs.append(torch.randn(9, 7, device=device))
    ipt.append(torch.rand(9, 7, device=device))
    unc.append(torch.rand(9, 7, device=device))
    _both(ws, gs, ipt, unc)


def test_tables_cached_and_rebuilt_on_new_addresses(device):
    ws, gs, ipt, unc = _tensors(device, torch.float32, nonfinite=False)
    tables._tables_by_addresses.clear()
    _both(ws, gs, ipt, unc)
    _both(ws, gs, ipt, unc)
    assert len(tables._tables_by_addresses) == 1
    gs = [g.clone() for g in gs]  # grads re-allocated (zero_grad(set_to_none=True))
    _both(ws, gs, ipt, unc)
    assert len(tables._tables_by_addresses) == 2


def test_empty(device):
    assert triton_backend.score_ema_update([], [], [], [], 0.85, 0.85) == 0
