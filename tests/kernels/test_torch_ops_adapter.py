"""The adapter linear autograd op (``elalora_kernels.torch_ops.adapter_linear``, the CPU backend's) against the
reference, under the float64-oracle rule of tests/_kernel_oracle.py.
"""
from __future__ import annotations

import pytest
import torch

import elalora_kernels
from elalora import ElaLoRALinear
from elalora_kernels import dispatch, reference
from elalora_kernels.torch_ops import adapter_linear
from _kernel_oracle import assert_within_eager_error, rounded

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (lead dims of x, in, out, r, active pattern)
SHAPES = [
    ((1,), 5, 300, 4, [1, 1, 0, 1]),
    ((7,), 123, 17, 6, [1, 0, 1, 1, 0, 1]),
    ((123,), 300, 5, 3, [1, 1, 1]),
    ((2, 3), 64, 33, 1, [1]),
]

GRADS = ("x", "P", "lam", "Q")
NAMES = ("y",) + GRADS


def _inputs(lead, d_in, d_out, r, pattern, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, generator=gen, dtype=torch.float64) if bias else None
    P = torch.randn(d_out, r, generator=gen, dtype=torch.float64) * 0.3
    lam = torch.randn(r, generator=gen, dtype=torch.float64)
    Q = torch.randn(r, d_in, generator=gen, dtype=torch.float64) * 0.3
    active = torch.tensor(pattern, dtype=torch.bool)
    g = torch.randn(*lead, d_out, generator=gen, dtype=torch.float64)
    return dict(x=x, weight=W, bias=b, P=P, lam=lam, Q=Q, active=active), g


def _cast(inputs, dtype):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype)
            if k in GRADS:
                v.requires_grad_(True)
        out[k] = v
    return out


def _run(fn, inputs, g, scale=2.0, dropout_p=0.0):
    y = fn(inputs["x"], inputs["weight"], inputs["bias"], inputs["P"], inputs["lam"], inputs["Q"], inputs["active"], scale, dropout_p)
    grads = torch.autograd.grad(y, [inputs[k] for k in GRADS], g.to(y.dtype))
    return [y.detach()] + [t.detach() for t in grads]


def _exact(inputs, dtype):
    """What an exact op gives on the inputs rounded to ``dtype``: evaluated in float64, with gradients."""
    return _cast({k: rounded(v, dtype) for k, v in inputs.items()}, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
def test_matches_float64_within_eager_error(shape, bias, dtype):
    inputs, g = _inputs(*shape, bias=bias)
    exact = _run(reference.adapter_linear, _exact(inputs, dtype), g.to(dtype))
    eager = _run(reference.adapter_linear, _cast(inputs, dtype), g)
    ours = _run(adapter_linear, _cast(inputs, dtype), g)
    for o in ours:
        assert o.dtype == dtype
    assert_within_eager_error(ours, eager, exact, dtype, NAMES)


def test_inactive_slots_contribute_nothing_and_get_zero_grad():
    inputs, g = _inputs((9,), 20, 11, 5, [1, 0, 1, 0, 0])
    x = _cast(inputs, torch.float32)
    y, _, dP, dlam, dQ = _run(adapter_linear, x, g)
    off = ~inputs["active"]
    assert (dP[:, off] == 0).all() and (dlam[off] == 0).all() and (dQ[off] == 0).all()
    x2 = dict(x, P=x["P"][:, ~off], lam=x["lam"][~off], Q=x["Q"][~off], active=x["active"][~off])
    y2 = adapter_linear(x2["x"], x2["weight"], x2["bias"], x2["P"], x2["lam"], x2["Q"], x2["active"], 2.0)
    torch.testing.assert_close(y, y2.detach())


def test_non_contiguous_inputs():
    """x transposed with batch dims, W stored transposed, P/lam/Q strided slices of bigger tensors."""
    gen = torch.Generator().manual_seed(1)
    d_in, d_out, r_max, r = 37, 29, 12, 5
    x = torch.randn(d_in, 6, 4, generator=gen, dtype=torch.float64).permute(2, 1, 0)  # [4, 6, d_in]
    W = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64).t()
    b = torch.randn(2 * d_out, generator=gen, dtype=torch.float64)[::2]
    P = torch.randn(d_out, r_max, generator=gen, dtype=torch.float64)[:, 1 : 1 + r]
    lam = torch.randn(2 * r_max, generator=gen, dtype=torch.float64)[::2][:r]
    Q = torch.randn(r_max, 2 * d_in, generator=gen, dtype=torch.float64)[:r, ::2]
    active = torch.tensor([1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)[::1][:r]
    g = torch.randn(d_out, 6, 4, generator=gen, dtype=torch.float64).permute(2, 1, 0)
    assert not any(t.is_contiguous() for t in (x, W, b, P, lam, Q, g))
    inputs = dict(x=x, weight=W, bias=b, P=P, lam=lam, Q=Q, active=active)
    for k in GRADS:
        inputs[k] = inputs[k].detach().requires_grad_(True)
    ours = _run(adapter_linear, inputs, g)
    ref = _run(reference.adapter_linear, inputs, g)
    for name, o, e in zip(NAMES, ours, ref):
        assert o.shape == e.shape, name
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(33,), (3, 5)], ids=["2d", "batched"])
def test_dropout_draws_the_reference_mask(dtype, lead):
    inputs, g = _inputs(lead, 40, 24, 4, [1, 1, 0, 1])
    p = 0.4
    torch.manual_seed(123)
    ref = _run(reference.adapter_linear, _cast(inputs, dtype), g, dropout_p=p)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    ours = _run(adapter_linear, _cast(inputs, dtype), g, dropout_p=p)
    after_ours = torch.rand(3)
    assert torch.equal(after_ref, after_ours), "the op must consume the RNG exactly as F.dropout does"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, o, e in zip(NAMES, ours, ref):
        torch.testing.assert_close(o, e, msg=name, **tol)
    # and a different seed gives a different mask
    torch.manual_seed(124)
    other = _run(adapter_linear, _cast(inputs, dtype), g, dropout_p=p)
    assert not torch.allclose(other[0], ours[0])


@pytest.mark.parametrize(
    "bias,dropout_p,lead,train_base",
    [(True, 0.0, (5,), False), (False, 0.0, (2, 3), False), (True, 0.3, (4,), False), (True, 0.0, (3,), True), (True, 0.5, (2, 2), True)],
)
def test_gradcheck_float64(bias, dropout_p, lead, train_base):
    inputs, _ = _inputs(lead, 7, 6, 4, [1, 0, 1, 1], bias=bias, seed=2)
    wants = list(GRADS) + (["weight"] + (["bias"] if bias else []) if train_base else [])
    args = [inputs[k].clone().requires_grad_(True) for k in wants]

    def fn(*tensors):
        kw = dict(inputs, **dict(zip(wants, tensors)))
        torch.manual_seed(7)  # the same dropout mask at every evaluation
        return adapter_linear(kw["x"], kw["weight"], kw["bias"], kw["P"], kw["lam"], kw["Q"], kw["active"], 1.5, dropout_p)

    assert torch.autograd.gradcheck(fn, args)


def test_nonfinite_upstream_gradient_propagates_like_the_reference():
    inputs, g = _inputs((6,), 10, 8, 3, [1, 1, 0])
    g[2, 3] = float("inf")
    g[4, 0] = float("nan")
    ours = _run(adapter_linear, _cast(inputs, torch.float32), g)
    ref = _run(reference.adapter_linear, _cast(inputs, torch.float32), g)
    for name, o, e in zip(NAMES, ours, ref):
        assert torch.equal(torch.isfinite(o), torch.isfinite(e)), name
        fin = torch.isfinite(e)
        torch.testing.assert_close(o[fin], e[fin], msg=name)


def test_empty_batch():
    inputs, g = _inputs((0,), 8, 5, 2, [1, 1])
    y, dx, dP, dlam, dQ = _run(adapter_linear, _cast(inputs, torch.float32), g)
    assert y.shape == (0, 5) and dx.shape == (0, 8)
    assert (dP == 0).all() and (dlam == 0).all() and (dQ == 0).all()


def test_autocast_bfloat16():
    inputs, g = _inputs((2, 17), 96, 80, 6, [1, 1, 1, 0, 1, 1])
    exact = _run(reference.adapter_linear, _exact(inputs, torch.bfloat16), g.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _run(reference.adapter_linear, _cast(inputs, torch.float32), g)
        ours = _run(elalora_kernels.adapter_linear, _cast(inputs, torch.float32), g)  # dispatch handles autocast
    assert ours[0].dtype == torch.bfloat16  # like nn.Linear and PEFT LoRA under autocast
    assert all(t.dtype == torch.float32 for t in ours[1:])  # gradients in the parameters' dtype
    assert_within_eager_error(ours, eager, exact, torch.bfloat16, NAMES)


@dispatch.use_backend(None)  # the default choice, whatever ELALORA_BACKEND says
def test_layer_uses_the_fused_op():
    layer = ElaLoRALinear(16, 12, r=3, r_max=6)
    with torch.no_grad():
        layer.lora_lam.normal_()
    x = torch.randn(4, 16, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "AdapterLinearFunctionBackward"
    y.sum().backward()
    assert layer.lora_P.grad[:, 3:].abs().sum() == 0  # slots beyond the active rank
    with dispatch.use_backend("reference"):
        y_ref = layer(x)
    assert type(y_ref.grad_fn).__name__ != "AdapterLinearFunctionBackward"
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("forced", ["reference", "cpu"])
def test_forcing_the_backend(forced):
    inputs, _ = _inputs((3,), 8, 6, 2, [1, 1])
    x = _cast(inputs, torch.float32)
    with dispatch.use_backend(forced):
        assert dispatch.backend_for(torch.device("cpu")) == forced
        y = elalora_kernels.adapter_linear(x["x"], x["weight"], x["bias"], x["P"], x["lam"], x["Q"], x["active"], 2.0)
    fused = type(y.grad_fn).__name__ == "AdapterLinearFunctionBackward"
    assert fused == (forced == "cpu")
    with pytest.raises(ValueError, match="not a backend"):
        dispatch.set_backend("nonsense")


def test_traces_under_torch_compile():
    """The op inside a compiled module (aot_eager: the tracing, without code generation)."""
    torch._dynamo.reset()
    inputs, g = _inputs((5,), 12, 10, 4, [1, 1, 0, 1])
    x = _cast(inputs, torch.float32)

    def f(x_, P, lam, Q):
        return adapter_linear(x_, x["weight"], x["bias"], P, lam, Q, x["active"], 2.0)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args = [x[k] for k in GRADS]
    y = compiled(*args)
    grads = torch.autograd.grad(y, args, g.float())
    y_ref = f(*args)
    grads_ref = torch.autograd.grad(y_ref, args, g.float())
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
