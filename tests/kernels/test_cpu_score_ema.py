"""The CPU score+EMA update (C++ extension and torch fallback) against the reference.

For float32 the contract is bit-identity with ``reference.score_ema_update``;
bfloat16/float16 parameters and gradients are widened exactly to float32, so
they are bit-identical too.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from elalora_kernels import _extension, reference, torch_ops
from elalora_kernels.cpu import score_ema as cpu_score

ODD_SHAPES = [(1,), (7,), (5, 123), (123, 7), (300, 5), (17, 33)]
# > the extension's serial threshold (2**15 elements), so the threaded path runs too.
BIG_SHAPES = ODD_SHAPES + [(384, 96), (3, 50000), (11,)]

requires_ext = pytest.mark.skipif(not _extension.available(), reason=f"C++ extension not built: {_extension.reason_unavailable()}")

IMPLS = {
    "extension": lambda *a: _extension.load().score_ema_update(*a),
    "dispatch_cpu": cpu_score.score_ema_update,
    "torch_fallback": torch_ops.score_ema_update,
}


def _impl_params():
    out = []
    for name in IMPLS:
        marks = [requires_ext] if name == "extension" else []
        out.append(pytest.param(name, marks=marks))
    return out


def _case(shapes, wdtype=torch.float32, gdtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(wdtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(gdtype) for s in shapes]
    total = sum(p.numel() for p in params)
    ipt = torch.rand(total, generator=gen)
    unc = torch.rand(total, generator=gen) * 0.1
    return params, grads, ipt, unc


def _views(flat, shapes, gap=0):
    views, offset = [], gap
    for s in shapes:
        n = torch.Size(s).numel()
        views.append(flat[offset : offset + n].view(s))
        offset += n + gap
    return views


def _run_both(impl, params, grads, ipt, unc, shapes, beta1=0.85, beta2=0.85):
    ref_ipt, ref_unc = ipt.clone(), unc.clone()
    n_ref = reference.score_ema_update(params, grads, _views(ref_ipt, shapes), _views(ref_unc, shapes), beta1, beta2)
    n = IMPLS[impl](params, grads, _views(ipt, shapes), _views(unc, shapes), beta1, beta2)
    return n, n_ref, ref_ipt, ref_unc


@pytest.mark.parametrize("impl", _impl_params())
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shapes", [ODD_SHAPES, BIG_SHAPES], ids=["odd", "big"])
def test_bit_identical_float32(impl, threads, shapes):
    torch.set_num_threads(threads)
    params, grads, ipt, unc = _case(shapes)
    for step, (b1, b2) in enumerate([(0.85, 0.85), (0.85, 0.85), (0.7, 0.95)]):
        n, n_ref, ref_ipt, ref_unc = _run_both(impl, params, grads, ipt, unc, shapes, b1, b2)
        assert n == n_ref == 0
        assert torch.equal(ipt, ref_ipt) and torch.equal(unc, ref_unc), f"differs from reference at step {step}"


@pytest.mark.parametrize("impl", _impl_params())
@pytest.mark.parametrize(
    "wdtype,gdtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
)
def test_bit_identical_low_precision_params(impl, wdtype, gdtype):
    params, grads, ipt, unc = _case(BIG_SHAPES, wdtype, gdtype, seed=1)
    n, n_ref, ref_ipt, ref_unc = _run_both(impl, params, grads, ipt, unc, BIG_SHAPES)
    assert n == n_ref == 0
    assert torch.equal(ipt, ref_ipt) and torch.equal(unc, ref_unc)


@pytest.mark.parametrize("impl", _impl_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_elements_are_skipped_and_counted(impl, dtype):
    params, grads, ipt, unc = _case(BIG_SHAPES, dtype, dtype, seed=2)
    big = dtype == torch.float16 and 6e4 or 1e30
    grads[0][0] = float("inf")
    grads[2][1, 3] = float("nan")
    grads[2][4, 100] = -float("inf")
    params[3][0, 0] = float("inf")  # inf · g
    grads[4][5, 1] = 0.0
    params[4][5, 1] = float("inf")  # inf · 0 = nan
    grads[7][1, 49999] = float("nan")  # in the threaded part, last element of a big tensor
    params[5][2, 2], grads[5][2, 2] = big, big  # overflows float32 only for float32 inputs
    n, n_ref, ref_ipt, ref_unc = _run_both(impl, params, grads, ipt, unc, BIG_SHAPES)
    expected = 6 if dtype == torch.float16 else 7
    assert n == n_ref == expected
    assert torch.equal(ipt, ref_ipt) and torch.equal(unc, ref_unc)
    assert torch.isfinite(ipt).all() and torch.isfinite(unc).all()


@pytest.mark.parametrize("impl", _impl_params())
def test_writes_exactly_the_emas_and_nothing_between(impl):
    """EMAs sit in a NaN-poisoned buffer with gaps: every EMA element must be
    written (a NaN left there fails the comparison) and every gap left alone."""
    shapes, gap = BIG_SHAPES, 3
    params, grads, _, _ = _case(shapes, seed=3)
    total = sum(p.numel() for p in params)
    size = total + gap * (len(shapes) + 1)
    ipt = torch.full((size,), float("nan"))
    unc = torch.full((size,), float("nan"))
    in_ema = torch.zeros(size, dtype=torch.bool)
    for v in _views(in_ema, shapes, gap):
        v.fill_(True)
    ipt[in_ema] = 0.0  # EMAs start at zero, as in the allocator
    unc[in_ema] = 0.0
    ref_ipt, ref_unc = ipt.clone(), unc.clone()
    reference.score_ema_update(params, grads, _views(ref_ipt, shapes, gap), _views(ref_unc, shapes, gap), 0.85, 0.85)
    IMPLS[impl](params, grads, _views(ipt, shapes, gap), _views(unc, shapes, gap), 0.85, 0.85)
    assert torch.isnan(ipt[~in_ema]).all() and torch.isnan(unc[~in_ema]).all()
    assert torch.equal(ipt[in_ema], ref_ipt[in_ema]) and torch.equal(unc[in_ema], ref_unc[in_ema])
    assert (ipt[in_ema] > 0).any()


@pytest.mark.parametrize("impl", _impl_params())
def test_non_contiguous_tensors(impl):
    shapes = [(40, 7), (3000, 21), (5,)]
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(s[::-1], generator=gen).t() if len(s) == 2 else torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(*s, 2, generator=gen)[..., 1] for s in shapes]
    ipt_big = [torch.rand(*s, 3, generator=gen) for s in shapes]
    unc_big = [torch.rand(*s, 3, generator=gen) for s in shapes]
    ipt = [t[..., 0] for t in ipt_big]
    unc = [t[..., 2] for t in unc_big]
    assert not any(t.is_contiguous() for t in params[:2] + grads + ipt + unc)
    ref_ipt_big = [t.clone() for t in ipt_big]
    ref_unc_big = [t.clone() for t in unc_big]
    reference.score_ema_update(params, grads, [t[..., 0] for t in ref_ipt_big], [t[..., 2] for t in ref_unc_big], 0.85, 0.85)
    IMPLS[impl](params, grads, ipt, unc, 0.85, 0.85)
    for a, b in zip(ipt_big + unc_big, ref_ipt_big + ref_unc_big):
        assert torch.equal(a, b)  # the written slot and the untouched ones


@pytest.mark.parametrize("impl", _impl_params())
def test_empty_tensors_and_lists(impl):
    assert cpu_score.score_ema_update([], [], [], [], 0.85, 0.85) == 0
    params = [torch.empty(0, 4), torch.ones(3)]
    grads = [torch.empty(0, 4), torch.full((3,), 2.0)]
    ipt, unc = [torch.empty(0, 4), torch.zeros(3)], [torch.empty(0, 4), torch.zeros(3)]
    assert IMPLS[impl](params, grads, ipt, unc, 0.5, 0.5) == 0
    assert torch.equal(ipt[1], torch.full((3,), 1.0))  # 0.5·0 + 0.5·2
    assert torch.equal(unc[1], torch.full((3,), 0.5))  # 0.5·0 + 0.5·|2 − 1|


@pytest.mark.parametrize("impl", _impl_params())
def test_bad_arguments_raise(impl):
    p, g, e = torch.ones(4), torch.ones(4), torch.zeros(4)
    with pytest.raises((ValueError, RuntimeError)):
        cpu_score.score_ema_update([p], [g, g], [e], [e], 0.85, 0.85)
    with pytest.raises((TypeError, RuntimeError)):
        IMPLS[impl]([p], [g], [e.double()], [e], 0.85, 0.85)
    with pytest.raises((TypeError, RuntimeError)):
        IMPLS[impl]([p.int()], [g], [e], [e.clone()], 0.85, 0.85)
    with pytest.raises((ValueError, RuntimeError)):
        IMPLS[impl]([p], [torch.ones(5)], [e], [e.clone()], 0.85, 0.85)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", _extension._UNSET)
    monkeypatch.setattr(_extension, "_error", None)
    monkeypatch.setitem(sys.modules, "elalora_kernels._C", None)  # makes the import fail
    monkeypatch.delenv("ELALORA_NO_EXTENSION", raising=False)
    params, grads, ipt, unc = _case(ODD_SHAPES, seed=5)
    with pytest.warns(RuntimeWarning, match="not available"):
        n, n_ref, ref_ipt, ref_unc = _run_both("dispatch_cpu", params, grads, ipt, unc, ODD_SHAPES)
    assert torch.equal(ipt, ref_ipt) and torch.equal(unc, ref_unc) and n == n_ref
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_both("dispatch_cpu", params, grads, ipt, unc, ODD_SHAPES)  # no second warning
    assert not _extension.available()


def test_extension_is_built():
    """`pip install -e .` builds it here; the fallback exists for machines without a compiler."""
    assert _extension.available(), _extension.reason_unavailable()
