"""Triton adapter_linear (forward + hand-written backward) against reference.adapter_linear,
under the float64-oracle rule of tests/_kernel_oracle.py.
"""
from __future__ import annotations

import pytest
import torch

from elalora_kernels import reference
from _kernel_oracle import assert_within_eager_error, rounded

triton_backend = pytest.importorskip("elalora_kernels.triton")


def _case(device, n, d_in, d_out, r_max, r, gaps=True, batch=None, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, d_in) if batch is None else (*batch, d_in)
    t = {
        "x": torch.randn(*shape, generator=gen, dtype=torch.float64),
        "W": torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5,
        "b": torch.randn(d_out, generator=gen, dtype=torch.float64) if bias else None,
        "P": torch.randn(d_out, r_max, generator=gen, dtype=torch.float64) * 0.3,
        "lam": torch.randn(r_max, generator=gen, dtype=torch.float64),
        "Q": torch.randn(r_max, d_in, generator=gen, dtype=torch.float64) * 0.3,
        "g": torch.randn(*shape[:-1], d_out, generator=gen, dtype=torch.float64),
    }
    active = torch.ones(r_max, dtype=torch.bool)
    if gaps and r > 2:
        active[1:r:3] = False  # gaps inside the slice the layer passes
    t["active"] = active
    return {k: (v.to(device) if v is not None else None) for k, v in t.items()}, r


def _run(fn, case, r, dtype, scale=2.0, dropout_p=0.0, seed=1, need_w=False, full=False, param_dtype=None):
    """One forward + backward; ``full``: the layer's interface (full-size P, λ, Q and the rank as a number),
    else the slices P[:, :r], λ[:r], Q[:r]. ``param_dtype``: P, λ, Q in another dtype than x (autocast)."""
    x = case["x"].to(dtype).clone().requires_grad_()
    P, lam, Q = (case[k].to(param_dtype or dtype).clone().requires_grad_() for k in ("P", "lam", "Q"))
    W = case["W"].to(dtype).clone().requires_grad_(need_w)
    b = case["b"].to(dtype) if case["b"] is not None else None
    torch.manual_seed(seed)
    if full:
        y = fn(x, W, b, P, lam, Q, case["active"], scale, dropout_p, rank=r)
    else:
        y = fn(x, W, b, P[:, :r], lam[:r], Q[:r], case["active"][:r], scale, dropout_p)
    y.backward(case["g"].to(dtype))
    out = {"y": y, "dx": x.grad, "dP": P.grad, "dlam": lam.grad, "dQ": Q.grad}
    if need_w:
        out["dW"] = W.grad
    return {k: v.detach().double() for k, v in out.items()}


def _compare(case, r, dtype, param_dtype=None, **kw):
    """``param_dtype`` P, λ, Q are cast to ``dtype`` inside the kernels: the op's inputs are all in ``dtype``."""
    exact = _run(reference.adapter_linear, {k: rounded(v, dtype) for k, v in case.items()}, r, torch.float64, **kw)
    eager = _run(reference.adapter_linear, case, r, dtype, **kw)
    fast = _run(triton_backend.adapter_linear, case, r, dtype, param_dtype=param_dtype, **kw)
    names = list(exact)
    assert_within_eager_error([fast[k] for k in names], [eager[k] for k in names], [exact[k] for k in names], dtype, names)
    return fast, exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 67])
def test_shapes_and_dtypes(device, n, dtype):
    # in/out not multiples of any block; rank slice 13 of 20 slots with gaps
    case, r = _case(device, n, 200, 150, 20, 13)
    _compare(case, r, dtype)


@pytest.mark.parametrize(
    "r_max,r,dtype",
    [(1, 1, torch.float32), (2, 2, torch.float32), (16, 9, torch.float32), (32, 17, torch.float32),
     (32, 32, torch.float32), (32, 32, torch.bfloat16)],
)
def test_ranks(device, r_max, r, dtype):
    case, r = _case(device, 7, 70, 33, r_max, r)
    _compare(case, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_same_mask(device, dtype):
    """p > 0: the mask is drawn first with F.dropout, so one seed gives the reference's mask."""
    case, r = _case(device, 67, 90, 40, 8, 6)
    _compare(case, r, dtype, dropout_p=0.3)


def test_batched_input_no_bias_and_weight_grad(device):
    case, r = _case(device, 0, 48, 40, 8, 8, batch=(2, 3), bias=False)
    fast, _ = _compare(case, r, torch.float32, need_w=True)
    assert fast["y"].shape == (2, 3, 40)


@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("n,r_max,r", [(1, 40, 9), (200, 20, 13), (123, 7, 7)])
def test_full_size_interface(device, n, r_max, r, dtype, param_dtype):
    """The layer's interface: full-size P, λ, Q (float32 under autocast, cast inside the kernels) and the rank
    as a number; gradients come back full-size in the parameters' dtype, exactly 0 beyond slot r (the
    buffers start as NaN). n = 200 splits every reduction over several programs (reduced in-kernel)."""
    case, r = _case(device, n, 70, 33, r_max, r)
    fast, _ = _compare(case, r, dtype, param_dtype=param_dtype, full=True)
    assert fast["dP"].shape == (33, r_max) and fast["dlam"].shape == (r_max,) and fast["dQ"].shape == (r_max, 70)
    assert (fast["dP"][:, r:] == 0).all() and (fast["dlam"][r:] == 0).all() and (fast["dQ"][r:] == 0).all()


def test_in_kernel_reductions_are_deterministic(device):
    case, r = _case(device, 200, 70, 33, 20, 13)
    first, second = (_run(triton_backend.adapter_linear, case, r, torch.float32, full=True) for _ in range(2))
    for name in ("dP", "dlam", "dQ"):
        assert torch.equal(first[name], second[name]), name


def test_inactive_slots_get_exactly_zero_grad(device):
    case, r = _case(device, 7, 70, 33, 16, 10)
    fast = _run(triton_backend.adapter_linear, case, r, torch.float32)
    inactive = ~case["active"][:r]
    assert inactive.any()
    assert (fast["dlam"][:r][inactive] == 0).all()
    assert (fast["dP"][:, :r][:, inactive] == 0).all()
    assert (fast["dQ"][:r][inactive] == 0).all()
    assert (fast["dP"][:, r:] == 0).all() and (fast["dQ"][r:] == 0).all()  # slots beyond the slice


def test_no_grad_forward(device):
    case, r = _case(device, 67, 200, 150, 20, 13)
    args = (case["W"].float(), case["b"].float(), case["P"][:, :r].float(), case["lam"][:r].float(),
            case["Q"][:r].float(), case["active"][:r], 2.0)
    with torch.no_grad():
        y = triton_backend.adapter_linear(case["x"].float(), *args)
    torch.testing.assert_close(y, reference.adapter_linear(case["x"].float(), *args), rtol=1e-5, atol=1e-5)


def test_layer_through_dispatch(device):
    """ElaLoRALinear (sliced, strided P) on the Triton backend matches the reference backend."""
    from elalora import ElaLoRALinear
    from elalora_kernels import use_backend

    gen = torch.Generator().manual_seed(3)
    layer = ElaLoRALinear(45, 37, r=5, r_max=12, generator=gen).to(device)
    with torch.no_grad():
        layer.lora_lam.normal_(generator=None)
    x = torch.randn(4, 9, 45, device=device)
    grads = {}
    for backend in ("reference", "triton"):
        layer.zero_grad(set_to_none=True)
        with use_backend(backend):
            y = layer(x)
        (y * torch.linspace(-1, 1, 37, device=device)).sum().backward()
        grads[backend] = [y.detach()] + [p.grad.clone() for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
    for a, b in zip(grads["reference"], grads["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("r_max,r,dtype", [(128, 128, torch.bfloat16), (256, 201, torch.float32)])
def test_large_ranks(device, r_max, r, dtype):
    """128- and 256-wide rank blocks (the largest supported); their fit on each GPU is checked in arch_compile.py."""
    case, r = _case(device, 19, 40, 36, r_max, r)
    _compare(case, r, dtype)


def test_rank_above_the_limit_is_rejected_before_any_work(device):
    from elalora_kernels.limits import MAX_R_MAX

    r = MAX_R_MAX + 1
    x = torch.randn(3, 8, device=device)
    P, lam, Q = torch.zeros(5, r, device=device), torch.zeros(r, device=device), torch.zeros(r, 8, device=device)
    with pytest.raises(ValueError, match=f"up to r_max = {MAX_R_MAX}"):
        triton_backend.adapter_linear(x, torch.zeros(5, 8, device=device), None, P, lam, Q,
                                      torch.ones(r, dtype=torch.bool, device=device), 1.0)
