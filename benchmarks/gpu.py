"""GPU check of the Triton (and CUDA C++) kernels — one script, ready for any CUDA GPU.

    python benchmarks/gpu.py                  # CUDA: checks, timings, table + JSON (make gpu-check, < 8 min on an H200)
    python benchmarks/gpu.py --smoke          # anywhere: tiny shapes under TRITON_INTERPRET=1 on CPU (CI)
    python benchmarks/gpu.py --host-only      # host time per allocator.step() (stub launcher; CPU or GPU)

1. Correctness against ``elalora_kernels.reference``: the relative error of
   the kernel and of eager PyTorch in the same dtype, both against float64,
   side by side (adapter at r up to 128, under autocast too); score+EMA
   bit-identical, through the allocator's launch plan on the production
   layout (16-byte-aligned EMA views).
2. Device time from CUDA events around many back-to-back calls (the median
   of several rounds), and host time per call (the time to enqueue them)
   reported separately:
   * adapter forward+backward (N = 8192, d = 4096, bf16, r in {8, 16, 64, 128},
     and fp32 weights under bf16 autocast) against the frozen base linear
     alone, PEFT LoRA and PEFT AdaLoRA layers and the eager reference;
   * score+EMA over a 7B-class adapter set (32 layers x 7 projections, r_max
     32 = 2·r for r = 16) with the prebuilt launch plan, the plan captured in
     a CUDA graph, the CUDA C++ kernel, and the baselines: an eager per-tensor
     loop (no per-tensor sync), ``torch._foreach_*``, ``torch.compile`` and a
     device copy of the same bytes;
   * host time per ``RankAllocator.step()`` on the same set with a stub in
     place of the launch (target <= 100 µs).
3. Prints the table last, writes it as Markdown (``--table``) and everything as JSON (``--json``).

In ``--smoke`` mode the numbers are interpreter timings on CPU and mean
nothing; the mode proves the script runs end to end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 on CPU")
    ap.add_argument("--host-only", action="store_true", help="only the host time per allocator.step() (7B-class set)")
    ap.add_argument("--json", default=None, help="results (default benchmarks/gpu_results.json; smoke: the temp dir)")
    ap.add_argument("--table", default=None, help="also write the table as Markdown to this file")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return ap.parse_args(argv)


ARGS = parse_args()
import torch  # noqa: E402

ON_GPU = torch.cuda.is_available() and not ARGS.smoke
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: kernels run on CPU tensors
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(ROOT))

import importlib  # noqa: E402

import torch.nn as nn  # noqa: E402
import triton  # noqa: E402

import elalora_kernels.triton as tk  # noqa: E402
from elalora_kernels import ScoreEmaPlan, reference, use_backend  # noqa: E402

se = importlib.import_module("elalora_kernels.triton.score_ema")  # the module (the package re-exports the function)

if not (ON_GPU or ARGS.smoke or ARGS.host_only):
    sys.exit("benchmarks/gpu.py: no CUDA device (use --smoke for the tiny interpreter run, --host-only for host time)")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SMALL = ARGS.smoke  # tiny shapes

ROWS: list[dict] = []  # the final table
CHECKS: list[dict] = []
LLAMA_7B = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]  # q, k, v, o, gate, up, down


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int | None = None, rounds: int = 5) -> tuple[float, float]:
    """(device ms per call, host µs per call): CUDA events around ``reps`` back-to-back calls, median of ``rounds``.

    Host time is the wall time to enqueue the calls (the GPU runs behind), so it
    is what Python and the launches cost. On CPU (smoke) both are wall time.
    """
    reps = reps or (2 if SMALL else 20)
    fn()
    sync()
    dev, host = [], []
    for _ in range(1 if SMALL else rounds):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host.append((time.perf_counter() - t0) / reps * 1e6)
        if DEVICE.type == "cuda":
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end) / reps)
        else:
            dev.append(host[-1] / 1e3)
    return statistics.median(dev), statistics.median(host)


def rel_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.double()
    return float((a.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


def row(section, name, ms, host_us=None, **extra):
    ROWS.append({"section": section, "name": name, "ms": ms, "host_us": host_us, **extra})


def check(kernel: str, ok: bool, **detail):
    CHECKS.append({"kernel": kernel, "ok": bool(ok), **detail})


# ----------------------------------------------------------------------------- adapter
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def adapter_inputs(n, d_in, d_out, r, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(DEVICE)  # noqa: E731
    return {
        "x": mk(n, d_in), "W": mk(d_out, d_in, std=d_in**-0.5), "b": mk(d_out, std=0.1),
        "P": mk(d_out, 2 * r, std=0.02), "lam": mk(2 * r, std=0.5), "Q": mk(2 * r, d_in, std=0.02),
        "active": torch.ones(2 * r, dtype=torch.bool, device=DEVICE), "g": mk(n, d_out), "r": r,
    }


def adapter_run(fn, t, dtype, autocast=None):
    """One call on the layer's slices P[:, :r], λ[:r], Q[:r] (P strided, as ElaLoRALinear passes it)."""
    r = t["r"]
    x = t["x"].to(dtype).clone().requires_grad_()
    P, lam, Q = (t[k].to(dtype).clone().requires_grad_() for k in ("P", "lam", "Q"))
    with torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None):
        y = fn(x, t["W"].to(dtype), t["b"].to(dtype), P[:, :r], lam[:r], Q[:r], t["active"][:r], 2.0, 0.0)
    y.backward(t["g"].to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, "dP": P.grad, "dlam": lam.grad, "dQ": Q.grad}


def check_adapter(n, d_in, d_out, r, dtype, autocast=None):
    """Triton through the dispatch layer (which handles autocast) against float64 and eager in the compute dtype."""
    import elalora_kernels

    compute = autocast or dtype
    t = adapter_inputs(n, d_in, d_out, r)
    t["active"][1] = False  # a gap in the active mask
    exact = adapter_run(reference.adapter_linear, t, torch.float64)
    eager = adapter_run(reference.adapter_linear, t, compute)
    with elalora_kernels.use_backend("triton"):
        fast = adapter_run(elalora_kernels.adapter_linear, t, dtype, autocast)
    tag = f"{str(dtype).replace('torch.', '')}{' + autocast ' + str(autocast).replace('torch.', '') if autocast else ''}"
    for k in exact:
        e_fast, e_eager = rel_err(fast[k], exact[k]), rel_err(eager[k], exact[k])
        ok = e_fast <= 2 * e_eager + FLOOR[compute]
        check("adapter_linear", ok, output=k, shape=[n, d_in, d_out, r], dtype=tag, rel_err_kernel=e_fast,
              rel_err_eager=e_eager)
        print(f"  adapter {tag:22s} N={n} d={d_in}x{d_out} r={r} {k:5s} rel err vs fp64: "
              f"triton {e_fast:.2e}  eager {e_eager:.2e}  {'ok' if ok else 'FAIL'}")


def peft_layers(W, b, r):
    """PEFT LoRA and AdaLoRA layers over a copy of the same frozen base (None each if peft is missing)."""
    try:
        from peft import AdaLoraConfig, LoraConfig
        from peft.tuners.adalora.layer import SVDLinear
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return {"PEFT LoRA": None, "PEFT AdaLoRA": None}
    layers = {}
    for name in ("PEFT LoRA", "PEFT AdaLoRA"):
        base = nn.Linear(W.shape[1], W.shape[0], device=DEVICE, dtype=W.dtype)
        with torch.no_grad():
            base.weight.copy_(W)
            base.bias.copy_(b)
        base.requires_grad_(False)
        if name == "PEFT LoRA":
            layer = LoraLinear(base, "default", LoraConfig(r=r, lora_alpha=16), r=r, lora_alpha=16)
        else:
            layer = SVDLinear(base, "default", AdaLoraConfig(init_r=r, total_step=1000), r=r, lora_alpha=16)
        layers[name] = layer.to(DEVICE, W.dtype)
    return layers


def time_adapter(n, d, r, dtype, autocast=None):
    """Forward+backward of one adapted layer (x requires grad, as inside a network) against the base alone."""
    t = adapter_inputs(n, d, d, r, seed=1)
    x = t["x"].to(dtype).requires_grad_()
    W, b = t["W"].to(dtype), t["b"].to(dtype)
    g = t["g"].to(autocast or dtype)
    P, lam, Q = (t[k].to(dtype).requires_grad_() for k in ("P", "lam", "Q"))
    act = t["active"]
    import elalora_kernels

    def amp():
        return torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None)

    def base_fb():  # grads returned, not accumulated: no extra add in the timing
        with amp():
            y = torch.nn.functional.linear(x, W, b)
        torch.autograd.grad(y, (x,), g)

    def ours_fb():
        with amp():
            y = elalora_kernels.adapter_linear(x, W, b, P[:, :r], lam[:r], Q[:r], act[:r], 2.0, 0.0)
        torch.autograd.grad(y, (x, P, lam, Q), g)

    def eager_fb():
        with amp():
            y = reference.adapter_linear(x, W, b, P[:, :r], lam[:r], Q[:r], act[:r], 2.0, 0.0)
        torch.autograd.grad(y, (x, P, lam, Q), g)

    def layer_fb(layer):
        params = [p for p in layer.parameters() if p.requires_grad]

        def run():
            with amp():
                y = layer(x)
            torch.autograd.grad(y, [x] + params, g)
        return run

    tag = f"N={n} d={d} r={r} {str(dtype).replace('torch.', '')}{' autocast ' + str(autocast).replace('torch.', '') if autocast else ''}"
    with elalora_kernels.use_backend("triton"):
        ms_base, h_base = timed(base_fb)
        ms_ours, h_ours = timed(ours_fb)
    row("adapter fwd+bwd", f"base linear alone {tag}", ms_base, h_base)
    row("adapter fwd+bwd", f"ElaLoRA (triton) {tag}", ms_ours, h_ours, x_base=ms_ours / ms_base,
        target="<= 1.15x base", met=ms_ours / ms_base <= 1.15)
    overheads = {"ElaLoRA": ms_ours - ms_base}
    for name, layer in peft_layers(W, b, r).items():
        if layer is None:
            row("adapter fwd+bwd", f"{name} {tag}", None, note="peft not installed")
            continue
        ms, h = timed(layer_fb(layer))
        overheads[name] = ms - ms_base
        row("adapter fwd+bwd", f"{name} {tag}", ms, h, x_base=ms / ms_base)
    ms_eager, h_eager = timed(eager_fb)
    row("adapter fwd+bwd", f"eager reference {tag}", ms_eager, h_eager, x_base=ms_eager / ms_base)
    if "PEFT LoRA" in overheads:
        half = overheads["ElaLoRA"] <= 0.5 * overheads["PEFT LoRA"]
        row("adapter fwd+bwd", f"overhead ElaLoRA / PEFT LoRA {tag}", None,
            ratio=overheads["ElaLoRA"] / max(overheads["PEFT LoRA"], 1e-9), target="<= 0.5", met=half)


# ----------------------------------------------------------------------------- score + EMA
def adapter_set(layers, dims, r_max, dtype, seed=0):
    """params, grads and EMA views of a model's adapters in the allocator's layout (16-byte-aligned views)."""
    from elalora.allocator import _aligned_offsets, _views

    g = torch.Generator(device="cpu").manual_seed(seed)
    params, grads = [], []
    for _ in range(layers):
        for out_f, in_f in dims:
            for shape in ((out_f, r_max), (r_max,), (r_max, in_f)):
                params.append((torch.randn(shape, generator=g) * 0.02).to(DEVICE, dtype))
                grads.append((torch.randn(shape, generator=g) * 1e-3).to(DEVICE, dtype))
    offsets = _aligned_offsets(params)
    flat_i = torch.rand(offsets[-1], generator=g).to(DEVICE)
    flat_u = torch.rand(offsets[-1], generator=g).to(DEVICE)
    return params, grads, _views(flat_i, params, offsets), _views(flat_u, params, offsets)


def check_score_ema(dtype):
    """The allocator's plan on the production layout, and the CUDA C++ kernel, bit for bit."""
    params, grads, vi, vu = adapter_set(2, [(150, 67), (33, 200)] if SMALL else LLAMA_7B[:2], 16, dtype)
    grads[0].view(-1)[3] = float("inf")
    grads[4].view(-1)[1] = float("nan")
    ri, ru = [t.clone() for t in vi], [t.clone() for t in vu]
    n_ref = reference.score_ema_update(params, grads, ri, ru, 0.85, 0.85)
    big = [p.numel() >= se.BLOCK for p in params]
    impls = [("triton", None)] + ([("cuda", "cuda")] if ON_GPU and se.cuda_extension() is not None else [])
    for name, env in impls:
        fi, fu = [t.clone() for t in vi], [t.clone() for t in vu]
        if env:
            os.environ["ELALORA_SCORE_EMA"] = env
        try:
            plan = se.LaunchPlan(fi, fu)
            plan.update(params, grads, 0.85, 0.85)
            n = plan.read_count()
        finally:
            os.environ.pop("ELALORA_SCORE_EMA", None)
        exact = n == n_ref and all(torch.equal(a, b) for a, b in zip(ri + ru, fi + fu))
        aligned = all(p.aligned for p in plan._plans)
        check(f"score_ema ({name})", exact and aligned, dtype=str(dtype), bit_exact=exact, aligned=aligned,
              full_blocks=sum(big), nonfinite=[n, n_ref])
        print(f"  score_ema {name:6s} {str(dtype):15s} bit-identical: {exact}  16-byte aligned: {aligned}  "
              f"tensors >= {se.BLOCK} elements: {sum(big)}  non-finite {n} (ref {n_ref})")


def foreach_update(params, grads, vi, vu, b1=0.85, b2=0.85):
    """The update with torch._foreach_* ops (per-tensor casts to float32 first; no non-finite guard)."""
    w = [p.float() for p in params]
    g = [q.float() for q in grads]
    ipt = torch._foreach_abs(torch._foreach_mul(w, g))
    new_i = torch._foreach_add(torch._foreach_mul(vi, b1), torch._foreach_mul(ipt, 1 - b1))
    diff = torch._foreach_abs(torch._foreach_sub(ipt, new_i))
    new_u = torch._foreach_add(torch._foreach_mul(vu, b2), torch._foreach_mul(diff, 1 - b2))
    torch._foreach_copy_(vi, new_i)
    torch._foreach_copy_(vu, new_u)


def time_score_ema(layers, dims, r_max, dtype, compile_baseline):
    params, grads, vi, vu = adapter_set(layers, dims, r_max, dtype, seed=2)
    total = sum(p.numel() for p in params)
    nbytes = total * (2 * params[0].element_size() + 4 * 4)  # read w, g, Ī, Ū; write Ī, Ū
    tag = f"{len(params)} tensors, {total / 1e6:.1f}M elements, {str(dtype).replace('torch.', '')}"
    gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    sec = "score+EMA"

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)  # a copy reads + writes the same bytes
    dst = torch.empty_like(src)
    ms_copy, _ = timed(lambda: dst.copy_(src))
    row(sec, f"device copy of the same bytes ({nbytes / 1e9:.2f} GB moved)", ms_copy, GBps=gbps(ms_copy))

    plan = se.LaunchPlan(vi, vu)
    ms_plan, h_plan = timed(lambda: plan.update(params, grads, 0.85, 0.85))
    row(sec, f"triton, prebuilt launch plan ({tag})", ms_plan, h_plan, GBps=gbps(ms_plan), of_copy_bw=ms_copy / ms_plan,
        target=">= 80% copy bw", met=ms_copy / ms_plan >= 0.8)
    if ON_GPU:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                plan.update(params, grads, 0.85, 0.85)
            ms_g, h_g = timed(graph.replay)
            row(sec, "triton plan captured in a CUDA graph", ms_g, h_g, GBps=gbps(ms_g), of_copy_bw=ms_copy / ms_g)
        except Exception as e:  # noqa: BLE001 - a variant must not kill the run
            row(sec, "triton plan captured in a CUDA graph", None, note=f"failed: {type(e).__name__}: {e}"[:200])
        if se.cuda_extension() is not None:
            os.environ["ELALORA_SCORE_EMA"] = "cuda"
            try:
                cplan = se.LaunchPlan(vi, vu)
                ms_cu, h_cu = timed(lambda: cplan.update(params, grads, 0.85, 0.85))
            finally:
                os.environ.pop("ELALORA_SCORE_EMA")
            row(sec, "CUDA C++ kernel (csrc/cuda), prebuilt plan", ms_cu, h_cu, GBps=gbps(ms_cu), of_copy_bw=ms_copy / ms_cu)
        else:
            row(sec, "CUDA C++ kernel (csrc/cuda)", None, note="not built (elalora_kernels._C_cuda missing)")

    def eager_loop():  # per-tensor, counts kept on the device: no per-tensor sync
        for w, g, i, u in zip(params, grads, vi, vu):
            reference.score_ema_update_one(w, g, i, u, 0.85, 0.85)

    ms_eager, h_eager = timed(eager_loop, reps=2 if SMALL else 5)
    row(sec, "eager per-tensor loop (no per-tensor sync)", ms_eager, h_eager, GBps=gbps(ms_eager))
    ms_fe, h_fe = timed(lambda: foreach_update(params, grads, vi, vu), reps=2 if SMALL else 5)
    row(sec, "torch._foreach_* (no non-finite guard)", ms_fe, h_fe, GBps=gbps(ms_fe))
    if compile_baseline:
        try:
            one = torch.compile(reference.score_ema_update_one, dynamic=True)

            def compiled():
                for w, g, i, u in zip(params, grads, vi, vu):
                    one(w, g, i, u, 0.85, 0.85)

            t0 = time.perf_counter()
            compiled()
            sync()
            warm = time.perf_counter() - t0
            ms_c, h_c = timed(compiled, reps=5)
            row(sec, "torch.compile, per-tensor loop", ms_c, h_c, GBps=gbps(ms_c), note=f"first call incl. compile {warm:.0f} s")
        except Exception as e:  # noqa: BLE001
            row(sec, "torch.compile, per-tensor loop", None, note=f"failed: {type(e).__name__}: {e}"[:200])
    else:
        row(sec, "torch.compile, per-tensor loop", None, note="skipped")
    for r_ in ROWS:
        if r_["section"] == sec and r_["ms"] and "eager" not in r_["name"]:
            r_["x_vs_eager"] = ms_eager / r_["ms"]


def host_step_overhead(layers: int, dims, r: int, steps: int):
    """Host µs per RankAllocator.step() (no round) with a stub in place of the launch: Python + the plan's checks."""
    from elalora import ElaLoRAConfig, ElaLoRALinear, RankAllocator

    with use_backend("triton"):
        modules = []
        for _ in range(layers):
            for out_f, in_f in dims:
                base = nn.Linear(1, 1, bias=False, device=DEVICE, dtype=torch.bfloat16)
                # the frozen base is never read by the allocator: a broadcast view stands in for W0 (no memory)
                base.weight = nn.Parameter(torch.zeros((), device=DEVICE, dtype=torch.bfloat16).expand(out_f, in_f),
                                           requires_grad=False)
                modules.append(ElaLoRALinear.from_linear(base, r=r))
        model = nn.Sequential(*modules)
        config = ElaLoRAConfig(r=r, target_modules=".*", t_init=10**6, t_final=1, total_steps=10**7)  # no round
        alloc = RankAllocator(model, config)
        for p in alloc.params:
            p.grad = torch.zeros_like(p)
        launches = []
        alloc._score_plan = ScoreEmaPlan(alloc._ipt_views, alloc._unc_views, 0.85, 0.85,
                                         launcher=lambda *a: launches.append(1))
        alloc.step()  # builds the tables
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            alloc.step()
            times.append((time.perf_counter() - t0) * 1e6)
        grads_us = statistics.median(_time_us(lambda: [p.grad for p in alloc.params]) for _ in range(steps))
        # the score+EMA call alone: the launch plan against the per-call path (grouping, cache key, .item())
        weights, grads = alloc.params, [p.grad for p in alloc.params]
        plan = se.LaunchPlan(alloc._ipt_views, alloc._unc_views, launcher=lambda *a: None)
        plan.update(weights, grads, 0.85, 0.85)
        plan_us = statistics.median(_time_us(lambda: plan.update(weights, grads, 0.85, 0.85)) for _ in range(steps))
        real_launch, se.launch = se.launch, (lambda *a: None)
        try:
            percall_us = statistics.median(
                _time_us(lambda: se.score_ema_update(weights, grads, alloc._ipt_views, alloc._unc_views, 0.85, 0.85))
                for _ in range(max(3, steps // 30))
            )
        finally:
            se.launch = real_launch
    us = statistics.median(times)
    tag = f"{len(alloc.params)} tensors ({layers} layers x {len(dims)} matrices, r={r})"
    row("host", f"RankAllocator.step() host time, stub launcher, {tag}", None, host_us=us,
        target="<= 100 µs", met=us <= 100, rebuilds=alloc._score_plan.rebuilds)
    row("host", f"floor: reading the {len(alloc.params)} .grad attributes alone", None, host_us=grads_us)
    row("host", "score+EMA call alone: launch plan (LaunchPlan.update), stub launch", None, host_us=plan_us)
    row("host", "score+EMA call alone: per-call path (score_ema_update: grouping, cache key, .item()), stub launch",
        None, host_us=percall_us)
    print(f"  host time per allocator.step(): median {us:.0f} µs over {steps} steps "
          f"(reading the grads alone: {grads_us:.0f} µs); table builds: {alloc._score_plan.rebuilds}")


def _time_us(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


# ----------------------------------------------------------------------------- rank scores
def check_and_time_rank_scores(layers, dims, r_max):
    params, _, vi, vu = adapter_set(layers, dims, r_max, torch.float32, seed=3)
    ipt = [tuple(vi[k : k + 3]) for k in range(0, len(vi), 3)]
    unc = [tuple(vu[k : k + 3]) for k in range(0, len(vu), 3)]
    exact = reference.rank_scores([tuple(t.double() for t in m) for m in ipt], [tuple(t.double() for t in m) for m in unc])
    e_fast = rel_err(tk.rank_scores(ipt, unc), exact)
    e_eager = rel_err(reference.rank_scores(ipt, unc), exact)
    ok = e_fast <= 2 * e_eager + 1e-6
    check("rank_scores", ok, matrices=len(ipt), rel_err_kernel=e_fast, rel_err_eager=e_eager)
    print(f"  rank_scores {len(ipt)} matrices r_max={r_max}: rel err vs fp64: triton {e_fast:.2e}  eager {e_eager:.2e}"
          f"  {'ok' if ok else 'FAIL'}")
    ms_tri, h_tri = timed(lambda: tk.rank_scores(ipt, unc))
    ms_eager, h_eager = timed(lambda: reference.rank_scores(ipt, unc), reps=2 if SMALL else 5)
    row("rank scores", f"triton, one launch ({len(ipt)} matrices)", ms_tri, h_tri, x_vs_eager=ms_eager / ms_tri)
    row("rank scores", "eager per-matrix loop (reference)", ms_eager, h_eager)


# ----------------------------------------------------------------------------- report
def table_lines(name: str, seconds: float) -> list[str]:
    lines = [f"results ({name}; {seconds:.0f} s)", "",
             "| section | what | device ms | host µs | notes |", "|---|---|---:|---:|---|"]
    for r_ in ROWS:
        ms = f"{r_['ms']:.4f}" if r_["ms"] is not None else "-"
        host = f"{r_['host_us']:.0f}" if r_.get("host_us") is not None else "-"
        notes = []
        for k, fmt in (("x_base", "{:.3f}x base"), ("ratio", "{:.2f}"), ("GBps", "{:.0f} GB/s"),
                       ("of_copy_bw", "{:.0%} of copy bw"), ("x_vs_eager", "{:.1f}x eager")):
            if r_.get(k) is not None:
                notes.append(fmt.format(r_[k]))
        if "target" in r_:
            verdict = "n/a (smoke)" if SMALL else ("met" if r_["met"] else "NOT met")
            notes.append(f"target {r_['target']}: {verdict}")
        if r_.get("note"):
            notes.append(r_["note"])
        lines.append(f"| {r_['section']} | {r_['name']} | {ms} | {host} | {'; '.join(notes)} |")
    return lines


def main():
    t_start = time.perf_counter()
    if ON_GPU:
        name = torch.cuda.get_device_name()
    else:
        name = "CPU (TRITON_INTERPRET=1" + (", smoke: numbers mean nothing)" if SMALL else "; host time only)")
    print(f"device: {name}\ntorch {torch.__version__}, triton {triton.__version__}\n")
    if SMALL:
        host_set = (2, [(96, 64), (40, 96)], 4, 20)
    else:
        host_set = (32, LLAMA_7B, 16, 300)

    if not ARGS.host_only:
        if SMALL:
            adapter_check = [(7, 200, 150, 13, torch.float32, None), (67, 96, 80, 5, torch.bfloat16, None),
                             (19, 48, 40, 128, torch.bfloat16, None), (33, 64, 48, 8, torch.float32, torch.bfloat16)]
            adapter_time = [(64, 96, r, torch.bfloat16, None) for r in (8, 16)] + [(64, 96, 16, torch.float32, torch.bfloat16)]
            score_set = (1, [(96, 64), (40, 96)], 16)
        else:
            adapter_check = [(1024, 1024, 1024, 16, torch.float32, None), (8192, 4096, 4096, 16, torch.bfloat16, None),
                             (67, 4096, 4096, 64, torch.float16, None), (4096, 4096, 4096, 128, torch.bfloat16, None),
                             (4096, 4096, 4096, 16, torch.float32, torch.bfloat16)]
            adapter_time = [(8192, 4096, r, torch.bfloat16, None) for r in (8, 16, 64, 128)]
            adapter_time.append((8192, 4096, 16, torch.float32, torch.bfloat16))
            score_set = (32, LLAMA_7B, 32)  # r = 16, r_max = 2r
        print("correctness vs float64 reference")
        for case in adapter_check:
            check_adapter(*case)
        for dtype in (torch.float32, torch.bfloat16):
            check_score_ema(dtype)
        check_and_time_rank_scores(*score_set)
        print("\ntiming")
        for case in adapter_time:
            time_adapter(*case)
            print(f"  adapter {case} done")
        time_score_ema(*score_set, torch.bfloat16, compile_baseline=not (SMALL or ARGS.no_compile))
        print("  score+EMA done")
    host_step_overhead(*host_set)

    seconds = time.perf_counter() - t_start
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "smoke": SMALL, "host_only": ARGS.host_only, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "checks": CHECKS, "timings": ROWS, "all_checks_ok": all(c["ok"] for c in CHECKS), "seconds": seconds,
    }
    if ARGS.json:
        out = pathlib.Path(ARGS.json)
    elif SMALL or not ON_GPU:  # not a GPU result: keep it out of the tree
        import tempfile

        out = pathlib.Path(tempfile.gettempdir()) / "elalora_gpu_results_smoke.json"
    else:
        out = ROOT / "benchmarks" / "gpu_results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    lines = table_lines(name, seconds)
    if ARGS.table:
        pathlib.Path(ARGS.table).write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nJSON: {out}")
    print(f"all correctness checks ok: {results['all_checks_ok']}")
    return 0 if results["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
