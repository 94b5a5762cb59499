"""Triton adapter_add (the adapter on a base that runs as its own module, e.g. a bitsandbytes one) against
reference.adapter_add, through the dispatch layer, under the float64-oracle rule of tests/_kernel_oracle.py."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import elalora_kernels
from elalora_kernels import use_backend

pytest.importorskip("triton")
from _kernel_oracle import assert_within_eager_error, rounded  # noqa: E402

D_IN, D_OUT, R_MAX = 37, 29, 12  # no multiple of any block
NAMES = ("y", "dy0", "dx", "dP", "dlam", "dQ")


def _inputs(device, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "y0": torch.randn(n, D_OUT, generator=gen, dtype=torch.float64),
        "x": torch.randn(n, D_IN, generator=gen, dtype=torch.float64),
        "P": torch.randn(D_OUT, R_MAX, generator=gen, dtype=torch.float64) * 0.3,
        "lam": torch.randn(R_MAX, generator=gen, dtype=torch.float64),
        "Q": torch.randn(R_MAX, D_IN, generator=gen, dtype=torch.float64) * 0.3,
        "g": torch.randn(n, D_OUT, generator=gen, dtype=torch.float64),
    }
    active = torch.ones(R_MAX, dtype=torch.bool)
    active[1::3] = False  # gaps inside the active slots
    return {k: v.to(device) for k, v in t.items()}, active.to(device)


def _run(backend, t, active, rank, dtype, autocast, dropout_p=0.0):
    """One forward + backward in ``dtype`` (the inputs' and parameters' dtype; float32 ones under bf16 autocast)."""
    y0, x, P, lam, Q = (t[k].to(dtype, copy=True).requires_grad_() for k in ("y0", "x", "P", "lam", "Q"))
    torch.manual_seed(1)
    with use_backend(backend), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = elalora_kernels.adapter_add(y0, x, P, lam, Q, active, 2.0, dropout_p, rank=rank)
    y.backward(t["g"].to(y.dtype))
    grads = {"y": y, "dy0": y0.grad, "dx": x.grad, "dP": P.grad, "dlam": lam.grad, "dQ": Q.grad}
    return {k: v.detach().double() for k, v in grads.items()}


@pytest.mark.parametrize("rank", [1, R_MAX])
@pytest.mark.parametrize("mode", ["fp32", "bf16 autocast"])
@pytest.mark.parametrize("n", [1, 7, 123])
def test_matches_reference_within_eager_error(device, n, mode, rank, dropout_p=0.0):
    t, active = _inputs(device, n)
    autocast = mode != "fp32"
    compute = torch.bfloat16 if autocast else torch.float32
    exact = _run("reference", {k: rounded(v, compute) for k, v in t.items()}, active, rank, torch.float64, False, dropout_p)
    eager = _run("reference", t, active, rank, torch.float32, autocast, dropout_p)
    fast = _run("triton", t, active, rank, torch.float32, autocast, dropout_p)
    assert_within_eager_error([fast[k] for k in NAMES], [eager[k] for k in NAMES], [exact[k] for k in NAMES], compute, NAMES)
    for name in ("dP", "dlam", "dQ"):  # full-size gradients: zeros beyond the rank
        assert not fast[name].narrow(0 if name != "dP" else 1, rank, R_MAX - rank).any(), name


def test_dropout_draws_the_reference_mask(device):
    test_matches_reference_within_eager_error(device, 7, "fp32", R_MAX, dropout_p=0.3)


def test_output_keeps_the_base_output_dtype_and_shape(device):
    t, active = _inputs(device, 6)
    y0 = t["y0"].to(torch.bfloat16).reshape(2, 3, D_OUT)
    x = t["x"].to(torch.bfloat16).reshape(2, 3, D_IN)
    with use_backend("triton"):
        y = elalora_kernels.adapter_add(y0, x, t["P"].float(), t["lam"].float(), t["Q"].float(), active, 2.0)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, D_OUT)


@pytest.mark.slow
@use_backend("triton")
def test_compiled_adapter_add_traces_one_graph(device):
    torch._dynamo.reset()
    t, active = _inputs(device, 5)
    counter = CompileCounterWithBackend("aot_eager")

    def step(y0, x, P, lam, Q):
        return elalora_kernels.adapter_add(y0, x, P, lam, Q, active, 2.0, rank=7)

    compiled = torch.compile(step, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    results = []
    for fn in (compiled, step):
        leaves = [t[k].float().requires_grad_() for k in ("y0", "x", "P", "lam", "Q")]
        y = fn(*leaves)
        y.backward(t["g"].float())
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("kind,compute", [("nf4", torch.float32), ("nf4", torch.bfloat16), ("int8", torch.float32)],
                         ids=["nf4-fp32", "nf4-bf16", "int8"])
def test_layer_on_a_quantized_base_matches_the_reference_backend(device, kind, compute, monkeypatch):
    """The whole layer on a bitsandbytes base: the base's output and its share of dx come from bitsandbytes
    in both runs; the adapter from the Triton kernels or from reference.adapter_add."""
    bnb = pytest.importorskip("bitsandbytes")
    from elalora import ElaLoRALinear

    monkeypatch.setattr("elalora.layer._warned_no_allocator", True)  # no allocator here, on purpose
    torch.manual_seed(0)
    if kind == "int8":
        base = bnb.nn.Linear8bitLt(D_IN, D_OUT, has_fp16_weights=False).to(device)  # moving quantizes
    else:
        base = bnb.nn.Linear4bit(D_IN, D_OUT, compute_dtype=compute, quant_type=kind).to(device)
    layer = ElaLoRALinear.from_linear(base, r=5, r_max=R_MAX)
    assert layer.quantization == kind  # the layer's adapter_add path
    with torch.no_grad():
        layer.lora_P.normal_(0, 0.3)
    layer.set_active_rank(3)
    x = torch.randn(2, 9, D_IN, device=device)
    g = torch.randn(2, 9, D_OUT, device=device)
    runs = []
    for backend in ("reference", "triton"):
        xr = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        with use_backend(backend):
            y = layer(xr)
        y.backward(g)
        runs.append([y, xr.grad, layer.lora_P.grad, layer.lora_lam.grad, layer.lora_Q.grad])
    tol = 1e-5 if compute == torch.float32 else 1e-2  # relative to max |value|: two roundings of one bf16 sum
    for name, want, got in zip(("y", "dx", "dP", "dlam", "dQ"), *runs):
        assert got.dtype == want.dtype == torch.float32, name
        assert (got - want).abs().max() <= tol * want.abs().max(), name
