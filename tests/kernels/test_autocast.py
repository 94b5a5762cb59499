"""Mixed precision through the dispatch layer, on every backend.

The matrix of the ordinary training set-ups: float32 weights under bf16/fp16
autocast (``Trainer(bf16=True)``), and pure bf16/fp16 weights; the input
requiring grad or not; dropout on or off. Every backend (the Triton one under
the interpreter) must give the output in the compute dtype, gradients in the
parameters' dtype, and values whose error against a float64 reference is at
most twice the error of eager PyTorch in the compute dtype, plus a small floor
(flash-attention's rule, as in tests/triton/test_adapter_linear.py).
"""
from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

import elalora_kernels
from elalora_kernels import reference

# A Triton kernel that falls back to torch ops would pass for the wrong reason: make it fail.
pytestmark = pytest.mark.filterwarnings("error::elalora_kernels.limits.KernelFallbackWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Triton: the interpreter on CPU
BACKENDS = ["reference", "cpu"] + (["triton"] if importlib.util.find_spec("triton") else [])
# name: (parameter dtype, autocast dtype or None); the compute dtype is the autocast one, else the parameters'
PRECISIONS = {
    "fp32 weights, bf16 autocast": (torch.float32, torch.bfloat16),
    "fp32 weights, fp16 autocast": (torch.float32, torch.float16),
    "bf16 weights": (torch.bfloat16, None),
    "fp16 weights": (torch.float16, None),
}
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative to the largest |value| of each output
SCALE = 2.0


def _inputs(seed=0):
    """float64 tensors of an odd-shaped case: N = 3·41 rows, in 70, out 37, rank slice 9 of 12 with a gap."""
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(3, 41, 70, generator=gen, dtype=torch.float64),
        "W": torch.randn(37, 70, generator=gen, dtype=torch.float64) / 70**0.5,
        "b": torch.randn(37, generator=gen, dtype=torch.float64),
        "P": torch.randn(37, 12, generator=gen, dtype=torch.float64) * 0.3,
        "lam": torch.randn(12, generator=gen, dtype=torch.float64),
        "Q": torch.randn(12, 70, generator=gen, dtype=torch.float64) * 0.3,
        "g": torch.randn(3, 41, 37, generator=gen, dtype=torch.float64),
    }
    t["active"] = torch.ones(12, dtype=torch.bool)
    t["active"][4] = False
    return {k: v.to(DEVICE) for k, v in t.items()}


def _run(op, t, param_dtype, autocast_dtype, x_grad, dropout_p, r=9):
    """One forward + backward of ``op`` on the layer's slices; returns the outputs by name."""
    x = t["x"].to(param_dtype).clone().requires_grad_(x_grad)  # clone: .to(float64) would alias the case
    P, lam, Q = (t[k].to(param_dtype).clone().requires_grad_() for k in ("P", "lam", "Q"))
    W, b = t["W"].to(param_dtype), t["b"].to(param_dtype)
    ctx = torch.autocast(DEVICE.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    torch.manual_seed(7)  # one dropout mask for every run
    with ctx:
        y = op(x, W, b, P[:, :r], lam[:r], Q[:r], t["active"][:r], SCALE, dropout_p)
    y.backward(t["g"].to(y.dtype))
    out = {"y": y, "dP": P.grad, "dlam": lam.grad, "dQ": Q.grad}
    if x_grad:
        out["dx"] = x.grad
    return out


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x requires grad", "x frozen"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_matches_reference(backend, precision, x_grad, dropout_p):
    param_dtype, autocast_dtype = PRECISIONS[precision]
    compute = autocast_dtype or param_dtype
    t = _inputs()
    exact = _run(reference.adapter_linear, t, torch.float64, None, x_grad, dropout_p)
    eager = _run(reference.adapter_linear, t, compute, None, x_grad, dropout_p)
    with elalora_kernels.use_backend(backend):
        ours = _run(elalora_kernels.adapter_linear, t, param_dtype, autocast_dtype, x_grad, dropout_p)

    assert ours["y"].dtype == compute, "the output is in the compute dtype, as nn.Linear's under autocast"
    for name in ("dP", "dlam", "dQ", "dx"):
        if name in ours:
            assert ours[name].dtype == param_dtype, f"{name} must be in the parameters' dtype"
    for name, value in ours.items():
        value, want = value.double(), exact[name]
        assert torch.isfinite(value).all(), f"{name}: non-finite values"
        mag = want.abs().max()
        err = ((value - want).abs().max() / mag).item()
        err_eager = ((eager[name].double() - want).abs().max() / mag).item()
        assert err <= 2 * err_eager + FLOOR[compute], f"{name}: rel err {err:.2e}, eager {compute} {err_eager:.2e}"
