"""The allocator's score+EMA plan on the Triton backend, its resident update (interpreter on CPU).

* EMAs bit-identical to the reference backend, step after step;
* the launch tables are built once and rebuilt only when a gradient's storage moves;
* a steady-state step runs no torch op at all around the launch (no host-to-device
  copy, no allocation, no sync: capturable in a CUDA graph);
* the non-finite count waits on the device until read (a StepInfo read, or a round,
  which also warns).
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _reliability_util as U  # noqa: E402
from elalora import RankAllocator  # noqa: E402
from elalora_kernels import ScoreEmaPlan, use_backend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy on inf/nan (interpreter)


def _allocator(device, total_steps=40):
    config = U.small_config(total_steps=total_steps)
    model, _ = U.build(config)
    return RankAllocator(model.to(device), config)


def _set_grads(alloc, seed, bad=False):
    g = torch.Generator().manual_seed(seed)
    for p in alloc.params:
        grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)  # same storage, as zero_grad(set_to_none=False) leaves it
    if bad:
        alloc.params[0].grad.view(-1)[:3] = float("nan")


def test_plan_matches_reference_and_builds_tables_once(device):
    fast, ref = _allocator(device), _allocator(device)
    for step in range(4):
        for backend, alloc in (("triton", fast), ("reference", ref)):
            _set_grads(alloc, step)
            with use_backend(backend):
                assert alloc.step().nonfinite == 0
    assert torch.equal(fast.ema_ipt, ref.ema_ipt) and torch.equal(fast.ema_unc, ref.ema_unc)
    assert fast.score_plan.resident.uploads == 1
    for p in fast.params:
        p.grad = p.grad.clone()  # new storage: the tables follow it
    with use_backend("triton"):
        fast.step()
    assert fast.score_plan.resident.uploads == 2


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@use_backend("triton")
def test_steady_state_step_runs_no_torch_op_besides_the_launch(device):
    launches = []
    alloc = _allocator(device)
    grads = [torch.randn_like(p) for p in alloc.params]
    ipt, unc = zip(*alloc.importance_emas())
    plan = ScoreEmaPlan(ipt, unc, 0.85, 0.85)
    plan.launcher = lambda *a: launches.append(a)
    plan.update(alloc.params, grads)  # first step: builds the tables
    with _RecordOps() as rec:
        for _ in range(3):
            assert plan.update(alloc.params, grads) is None  # the count stays on the device
    assert rec.ops == [], f"steady-state steps ran torch ops: {rec.ops}"
    assert len(launches) == 4 and plan.resident.uploads == 1  # one dtype: one launch per step


@use_backend("triton")
def test_nonfinite_count_waits_on_the_device_until_read(device):
    alloc = _allocator(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no per-step warning: it would need the count
        _set_grads(alloc, 0, bad=True)
        first = alloc.step()
        _set_grads(alloc, 1, bad=True)
        second = alloc.step()
    assert second.nonfinite == 6  # both steps' elements: read once, since the last read
    assert first.nonfinite == 0  # read after the second: nothing new since
    _set_grads(alloc, 2, bad=True)
    alloc.step()  # t = 2: counted, not read
    while alloc.t < 5:
        _set_grads(alloc, alloc.t)
        alloc.step()
    _set_grads(alloc, 5)
    with pytest.warns(RuntimeWarning, match="3 adapter gradient elements were inf/nan since the last read"):
        info = alloc.step()  # t = 5: the first round reads the count and warns
    assert info.round is not None and info.nonfinite == 3
    _set_grads(alloc, 6, bad=True)
    alloc.step()  # counted on the device, read by nothing but the total below
    assert alloc.nonfinite_total() == 12  # every element counted, each read counted once


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a device value on the host (``.item()``, ``float()``, ``int()`` of a tensor)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@use_backend("triton")
def test_a_round_reads_the_device_once(device, monkeypatch):
    """A round brings its scores and the device's non-finite count to the host in one transfer; pruning and
    the new ranks' initialisation read nothing back (before: 1 + 3 reads per new rank, plus the count)."""
    transfers = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: transfers.append(t.shape) or real_tolist(t))
    alloc = _allocator(device)
    while alloc.t < 5:
        _set_grads(alloc, alloc.t)
        alloc.step()
    _set_grads(alloc, 5, bad=True)
    transfers.clear()
    with _HostReads() as host, pytest.warns(RuntimeWarning, match="3 adapter gradient elements"):
        info = alloc.step()  # t = 5: the first round
    assert info.round is not None and info.round.moved > 0  # new ranks were initialised
    assert host.reads == 0 and len(transfers) == 1, (host.reads, transfers)
    assert info.nonfinite == 3 and alloc.nonfinite_total() == 3


def _many_layer_allocator(layers):
    """An allocator over ``layers`` tiny layers (3 tensors each), its launch stubbed, grads set."""
    from elalora import ElaLoRAConfig, ElaLoRALinear

    model = torch.nn.Sequential(*(ElaLoRALinear(8, 8, r=2) for _ in range(layers)))
    alloc = RankAllocator(model, ElaLoRAConfig(r=2, target_modules=".*", t_init=10**6, t_final=1, total_steps=10**7))
    alloc.score_plan.launcher = lambda *a: None
    for p in alloc.params:
        p.grad = torch.randn_like(p)
    return alloc


def _python_calls(fn) -> int:
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(1) if event == "call" else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return len(calls)


def _new_grads(alloc):
    for p in alloc.params:
        p.grad = torch.zeros_like(p)  # zero_grad(set_to_none=True) + backward: every gradient is a new tensor


@use_backend("triton")
def test_a_step_does_no_python_work_per_tensor_even_when_every_gradient_moves():
    """The pointer table is checked and rewritten in C++: the Python calls of a step do not grow with the model."""
    counts = {}
    for layers in (4, 40):
        alloc = _many_layer_allocator(layers)
        alloc.step()  # plans the table
        _new_grads(alloc)
        counts[layers] = _python_calls(alloc.step)
        assert alloc.score_plan.resident.uploads == 2  # the new addresses were uploaded
    assert counts[40] == counts[4], counts


@use_backend("triton")
def test_host_time_of_a_step_does_not_depend_on_gradients_moving():
    """672 tensors (the 7B-class count), stub launch: a step whose every gradient moved costs about what a
    steady one does (each kind interleaved with the other, medians; the absolute numbers are in
    benchmarks/RESULTS.md)."""
    import statistics
    import time

    alloc = _many_layer_allocator(224)
    alloc.step()
    steady, moved = [], []
    for _ in range(40):
        _new_grads(alloc)
        for sample in (moved, steady):
            t0 = time.perf_counter()
            alloc.step()
            sample.append(time.perf_counter() - t0)
    # the table rebuilt in Python (before the C++ table) made it 11x
    assert statistics.median(moved) <= 4 * statistics.median(steady) + 100e-6, (statistics.median(moved), statistics.median(steady))


@use_backend("triton")
def test_cuda_graph_replay_is_safe_exactly_while_the_gradients_stay(device):
    """A captured step replays the table as uploaded: safe while every parameter keeps its gradient tensor
    (zero_grad(set_to_none=False)), not once a backward re-allocates them; the plan says which holds."""
    alloc = _many_layer_allocator(3)
    plan = alloc.score_plan
    assert not plan.points_at_current_grads()  # nothing uploaded yet
    alloc.step()
    for p in alloc.params:
        p.grad.zero_()  # zero_grad(set_to_none=False): same tensors
    assert plan.points_at_current_grads()
    _new_grads(alloc)  # zero_grad(set_to_none=True) + backward
    assert not plan.points_at_current_grads()  # a replay now would read the old gradients' memory
    alloc.step()  # an eager step re-points the table
    assert plan.points_at_current_grads()


@use_backend("triton")
def test_a_capture_that_would_upload_the_table_is_refused(device, monkeypatch):
    """Under CUDA graph capture (simulated here) a step whose table is missing or stale raises, naming the
    fix, and changes nothing; a step whose table points at the present gradients runs (no upload)."""
    from elalora_kernels.triton import _common

    alloc = _many_layer_allocator(3)
    monkeypatch.setattr(_common, "capturing", lambda device: True)
    before = alloc.ema_ipt.clone()
    with pytest.raises(RuntimeError, match="Run one step eagerly first"):
        alloc.score_plan.update(alloc.params)  # never built: its first upload would be captured
    assert torch.equal(alloc.ema_ipt, before)
    monkeypatch.setattr(_common, "capturing", lambda device: False)
    alloc.score_plan.update(alloc.params)  # eager: builds and uploads the table
    monkeypatch.setattr(_common, "capturing", lambda device: True)
    uploads = alloc.score_plan.resident.uploads
    alloc.score_plan.update(alloc.params)  # same gradients: captured with no upload
    assert alloc.score_plan.resident.uploads == uploads
    _new_grads(alloc)  # a backward re-allocated the gradients: the table is stale
    after_eager = alloc.ema_ipt.clone()
    with pytest.raises(RuntimeError, match="does not point at the present gradients"):
        alloc.score_plan.update(alloc.params)
    assert torch.equal(alloc.ema_ipt, after_eager) and alloc.score_plan.resident.uploads == uploads


@use_backend("triton")
def test_the_python_table_stands_in_without_the_extension(device, monkeypatch):
    """Without the C++ extension the pointer table is kept in Python: same EMAs, same re-pointing."""
    import importlib

    resident = importlib.import_module("elalora_kernels.triton.resident_score_ema")
    monkeypatch.setattr(resident, "pointer_table", importlib.import_module("elalora_kernels.triton.pointer_table").PythonPointerTable)
    fast, ref = _allocator(device), _allocator(device)
    for step in range(3):
        for backend, alloc in (("triton", fast), ("reference", ref)):
            _new_grads(alloc)
            _set_grads(alloc, step)
            with use_backend(backend):
                alloc.step()
    assert torch.equal(fast.ema_ipt, ref.ema_ipt) and torch.equal(fast.ema_unc, ref.ema_unc)
    assert fast.score_plan.resident.uploads == 3 and fast.score_plan.points_at_current_grads()
    _new_grads(fast)
    assert not fast.score_plan.points_at_current_grads()
