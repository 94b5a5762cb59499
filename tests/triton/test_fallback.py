"""When a Triton kernel cannot compile or launch on the user's GPU (or lacks its dtype there), the op
runs with torch ops instead, after one warning that names the cause: a training run slows down, it
does not die. The failures are injected; the results must still match the reference."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _reliability_util as U  # noqa: E402
from elalora import RankAllocator  # noqa: E402
from elalora_kernels import reference, use_backend  # noqa: E402
from elalora_kernels.limits import KernelFallbackWarning  # noqa: E402
from elalora_kernels.triton import _common  # noqa: E402

tk = importlib.import_module("elalora_kernels.triton")
al = importlib.import_module("elalora_kernels.triton.adapter_linear")

pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy on inf/nan (interpreter)


@pytest.fixture
def compile_fails(monkeypatch):
    """Every Triton launch fails as a kernel too large for the GPU's shared memory does."""
    kernel_type = type(al._fwd_kernel)  # JITFunction on a GPU, InterpretedFunction under the interpreter

    def run(self, *args, **kwargs):
        raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(kernel_type, "run", run)


def _adapter(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 24, generator=g).to(device, dtype).requires_grad_()
    W = torch.randn(20, 24, generator=g).to(device, dtype)
    P, lam, Q = (torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in ((20, 6), (6,), (6, 24)))
    active = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool, device=device)
    return x, W, P, lam, Q, active


def _fwd_bwd(op, tensors, dropout_p=0.0):
    x, W, P, lam, Q, active = tensors
    torch.manual_seed(3)
    y = op(x, W, None, P, lam, Q, active, 2.0, dropout_p)
    grads = torch.autograd.grad(y, (x, P, lam, Q), torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y))
    return (y,) + grads


def _on_separate_base(adapter_add):
    """adapter_linear's signature over ``adapter_add``: the base output comes from its own module, as a
    quantized base's does (here F.linear, whose backward gives x the base's part of its gradient)."""
    return lambda x, W, b, *rest: adapter_add(F.linear(x, W, b), x, *rest)


ENTRIES = {
    "adapter_linear": (reference.adapter_linear, tk.adapter_linear),
    "adapter_add": (_on_separate_base(reference.adapter_add), _on_separate_base(tk.adapter_add)),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_adapter_falls_back_with_one_warning_naming_the_cause(device, compile_fails, dropout_p, entry):
    tensors = _adapter(device)
    oracle, op = ENTRIES[entry]
    want = _fwd_bwd(oracle, tensors, dropout_p)
    with pytest.warns(KernelFallbackWarning) as caught:
        got = _fwd_bwd(op, tensors, dropout_p)
        again = _fwd_bwd(op, tensors, dropout_p)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "adapter_linear" in message and "OutOfResources" in message and "shared memory" in message
    for a, b, c in zip(got, again, want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:elalora.*inf/nan:RuntimeWarning")
def test_score_ema_and_rank_scores_fall_back(device, compile_fails):

    config = U.small_config(total_steps=40)
    model, _ = U.build(config)
    alloc = RankAllocator(model.to(device), config)
    ref = RankAllocator(U.build(config)[0].to(device), config)
    for a in (alloc, ref):
        for p, seed in zip(a.params, range(100)):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        a.params[0].grad.view(-1)[0] = float("nan")
    with use_backend("reference"):
        ref.step()
    with use_backend("triton"), pytest.warns(KernelFallbackWarning, match="score_ema .*OutOfResources"):
        alloc.step()
        assert alloc.step().nonfinite == 2  # counted on the device by the torch ops, as by the kernel
    with use_backend("reference"):
        ref.step()
    torch.testing.assert_close(alloc.ema_ipt, ref.ema_ipt, rtol=0, atol=0)
    with use_backend("triton"), pytest.warns(KernelFallbackWarning, match="rank_scores"):
        scores = alloc.rank_scores()
    torch.testing.assert_close(scores, ref.rank_scores(), rtol=1e-6, atol=0)


def test_bfloat16_on_a_gpu_without_it_falls_back(device, monkeypatch):
    """A T4 (sm_75) has no bfloat16: the op says so once and runs with torch ops; float16 keeps its kernel."""
    monkeypatch.setattr(_common, "capability", lambda device: (7, 5))
    tensors = _adapter(device, torch.bfloat16)
    want = _fwd_bwd(reference.adapter_linear, tensors)
    with pytest.warns(KernelFallbackWarning, match="bfloat16 kernels need sm_80 or newer; this GPU is sm_75"):
        got = _fwd_bwd(tk.adapter_linear, tensors)
    for a, b in zip(got, want):  # both in bfloat16, rounded differently: within 2% of the largest value
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    _fwd_bwd(tk.adapter_linear, _adapter(device, torch.float16))  # no warning: the strict filter would raise
