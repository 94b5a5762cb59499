"""ElaLoRALinear over transformers' Conv1D (GPT-2: weight stored [in, out]) against the eager reference."""
import pytest
import torch

pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from elalora import ElaLoRALinear  # noqa: E402
from elalora_kernels import reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def wrapped(in_f, out_f, r, dtype, seed=0):
    torch.manual_seed(seed)
    conv = Conv1D(out_f, in_f).to(dtype)
    torch.nn.init.normal_(conv.bias)
    layer = ElaLoRALinear.from_linear(conv, r=r, r_max=2 * r, lora_alpha=2.0 * r,
                                      generator=torch.Generator().manual_seed(seed))
    return conv, layer


@pytest.mark.parametrize("in_f, out_f", [(1, 7), (7, 1), (123, 33), (16, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_at_init_and_shares_the_conv1d_parameters(in_f, out_f, dtype):
    conv, layer = wrapped(in_f, out_f, 2, dtype)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (in_f, out_f)
    assert layer.weight is conv.weight and layer.bias is conv.bias  # state-dict keys and shapes unchanged
    x = torch.randn(3, 5, in_f, dtype=dtype)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize("in_f, out_f, r", [(1, 7, 1), (123, 33, 3), (16, 48, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward_match_the_reference(in_f, out_f, r, dtype):
    _, layer = wrapped(in_f, out_f, r, dtype)
    with torch.no_grad():
        layer.lora_lam.normal_()
    layer.set_active_rank(r + 1)  # one slot beyond r: the active mask, not r, decides
    x = torch.randn(7, in_f, dtype=dtype, requires_grad=True)
    g = torch.randn(7, out_f, dtype=dtype)
    y = layer(x)
    grads = torch.autograd.grad(y, (x, layer.lora_P, layer.lora_lam, layer.lora_Q), g)

    k = r + 1
    params = [t.detach().clone().requires_grad_() for t in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference.adapter_linear(x_ref, layer.weight.t(), layer.bias, params[0][:, :k], params[1][:k],
                                     params[2][:k], layer.active[:k], layer.scale)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *params], g)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_merge_writes_the_transposed_delta_into_the_conv1d_weight():
    conv, layer = wrapped(16, 48, 4, torch.float32)  # ΔW is computed in float32 for every dtype
    with torch.no_grad():
        layer.lora_lam.normal_()
    x = torch.randn(4, 16, dtype=torch.float32)
    expected = layer(x)
    w0 = conv.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(conv.weight, w0 + layer.delta_weight().t(), **TOL[torch.float32])
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float32])
    torch.testing.assert_close(conv(x), expected, **TOL[torch.float32])  # the plain Conv1D now computes it
    layer.unmerge()
    torch.testing.assert_close(conv.weight, w0, **TOL[torch.float32])


@pytest.mark.parametrize("in_f, out_f, r", [(7, 33, 3), (16, 1, 2)])
def test_triton_kernel_takes_the_transposed_conv1d_weight(in_f, out_f, r):
    """On a GPU the layer hands the Triton kernels ``weight.t()``, a non-contiguous view (here: interpreter)."""
    triton_backend = pytest.importorskip("elalora_kernels.triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, layer = wrapped(in_f, out_f, r, torch.float32)
    layer.to(device)
    with torch.no_grad():
        layer.lora_lam.normal_()
    x = torch.randn(5, in_f, device=device)
    g = torch.randn(5, out_f, device=device)
    results = []
    for backend in (reference, triton_backend):
        params = [t.detach().clone().requires_grad_() for t in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
        xi = x.clone().requires_grad_()
        y = backend.adapter_linear(xi, layer.base_weight, layer.bias, params[0][:, :r], params[1][:r],
                                   params[2][:r], layer.active[:r], layer.scale, 0.0)
        results.append([y, *torch.autograd.grad(y, [xi, *params], g)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
