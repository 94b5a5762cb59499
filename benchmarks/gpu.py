"""GPU check of the Triton (and CUDA C++) kernels — one script, ready for any CUDA GPU.

    python benchmarks/gpu.py                  # CUDA: timings + checks, table + JSON (run by make gpu-check PY=python3)
    python benchmarks/gpu.py --smoke          # anywhere: tiny shapes under TRITON_INTERPRET=1 on CPU (CI)
    python benchmarks/gpu.py --host-only      # host time per allocator.step() (stub launcher; CPU or GPU)

GPU time is short and rare, so the run is ordered by importance and time-boxed
(``--time-limit``): every result is written to the JSON (and the table) as soon
as it exists, a task that fails is recorded and the next one runs, and tasks
left when the time is up are listed as skipped. In order:

1. adapter forward+backward at the headline shape (N = 8192, d = 4096, r = 16,
   bf16) against the frozen base linear alone and a PEFT LoRA layer;
2. score+EMA over a 7B-class adapter set (32 layers x 7 projections, r_max 32)
   with the allocator's launch plan, against a device copy of the same bytes, the
   Triton kernel beside the CUDA C++ one (when built: the faster one should ship);
3. host time per ``RankAllocator.step()`` on the same set, the launch replaced
   by a stub (target <= 100 µs): steady addresses, every gradient re-allocated
   every step, and the step right after a round;
4. correctness against ``elalora_kernels.reference`` (relative error of the
   kernel and of eager PyTorch in the same dtype, both against float64; score+EMA
   bit-identical on the production layout);
5. the other adapter cases (r in {8, 64, 128}, fp32 weights under bf16 autocast)
   and baselines (PEFT AdaLoRA, the eager reference);
6. the other score+EMA variants (CUDA graph, eager per-tensor loop,
   ``torch._foreach_*``) and the rank scores;
7. the cold ``torch.compile`` baseline, last: its compilation alone may take minutes.

Device time comes from CUDA events around many back-to-back calls (the median
of several rounds); host time per call (the time to enqueue them) is reported
separately. In ``--smoke`` mode the numbers are interpreter timings on CPU and
mean nothing; the mode proves the script runs end to end.
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
    ap.add_argument("--json", default=None, help="results (default benchmarks/gpu_results.json on a GPU, else the temp dir)")
    ap.add_argument("--table", default=None, help="the table as Markdown (default: the JSON's path with .md)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--time-limit", type=float, default=420.0,
                    help="seconds; tasks not started by then are recorded as skipped (default 420)")
    return ap.parse_args(argv)


ARGS = parse_args()
INHERITED_INTERPRET = os.environ.get("TRITON_INTERPRET")  # make gpu-check clears it; recorded to show it did
import torch  # noqa: E402

ON_GPU = torch.cuda.is_available() and not ARGS.smoke
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: kernels run on CPU tensors
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(ROOT))

import torch.nn as nn  # noqa: E402
import triton  # noqa: E402

import elalora_kernels.triton as tk  # noqa: E402
from elalora.allocator import flat_emas  # noqa: E402
from elalora_kernels import reference, use_backend  # noqa: E402
from elalora_kernels.triton import cuda_score_ema, score_ema_kernel  # noqa: E402
from elalora_kernels.triton.resident_score_ema import ResidentScoreEma  # noqa: E402

if not (ON_GPU or ARGS.smoke or ARGS.host_only):
    sys.exit("benchmarks/gpu.py: no CUDA device (use --smoke for the tiny interpreter run, --host-only for host time)")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SMALL = ARGS.smoke  # tiny shapes

ROWS: list[dict] = []  # the table, in the order measured
CHECKS: list[dict] = []
LLAMA_7B = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]  # q, k, v, o, gate, up, down
if ARGS.json:
    OUT = pathlib.Path(ARGS.json)
elif SMALL or not ON_GPU:  # not a GPU result: keep it out of the tree
    import tempfile

    OUT = pathlib.Path(tempfile.gettempdir()) / "elalora_gpu_results_smoke.json"
else:
    OUT = ROOT / "benchmarks" / "gpu_results.json"
TABLE = pathlib.Path(ARGS.table) if ARGS.table else OUT.with_suffix(".md")
if ON_GPU:
    DEVICE_NAME = torch.cuda.get_device_name()
else:
    DEVICE_NAME = "CPU (TRITON_INTERPRET=1" + (", smoke: numbers mean nothing)" if SMALL else "; host time only)")
T_START = time.perf_counter()
STATUS = {"complete": False, "failed_tasks": [], "skipped_tasks": []}


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
    save()


def check(kernel: str, ok: bool, **detail):
    CHECKS.append({"kernel": kernel, "ok": bool(ok), **detail})
    save()


def save() -> None:
    """Writes everything measured so far: a run cut off by its time limit still leaves its numbers."""
    seconds = time.perf_counter() - T_START
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": DEVICE_NAME, "smoke": SMALL, "host_only": ARGS.host_only, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(), "inherited_triton_interpret": INHERITED_INTERPRET, **STATUS,
        "checks": CHECKS, "timings": ROWS, "all_checks_ok": all(c["ok"] for c in CHECKS), "seconds": seconds,
    }
    _write_atomically(OUT, json.dumps(results, indent=2, default=str))
    _write_atomically(TABLE, "\n".join(table_lines(seconds)) + "\n")


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """A run killed mid-write (time limit, OOM killer) leaves the previous complete file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """One call as ElaLoRALinear makes it: full-size P, λ, Q (2r slots) and the active rank r as a number."""
    r = t["r"]
    x = t["x"].to(dtype).clone().requires_grad_()
    P, lam, Q = (t[k].to(dtype).clone().requires_grad_() for k in ("P", "lam", "Q"))
    with torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None):
        y = fn(x, t["W"].to(dtype), t["b"].to(dtype), P, lam, Q, t["active"], 2.0, 0.0, rank=r)
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


class _Holder(nn.Module):
    """One linear layer under a name PEFT can target."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base


def peft_layers(W, b, r):
    """PEFT LoRA and AdaLoRA layers over a copy of the same frozen base (None each if peft is missing).

    Made through ``get_peft_model`` with every config field by keyword: the layer classes' constructors
    changed between PEFT versions, the public entry point did not.
    """
    try:
        from peft import AdaLoraConfig, LoraConfig, get_peft_model
    except ImportError:
        return {"PEFT LoRA": None, "PEFT AdaLoRA": None}
    configs = {
        "PEFT LoRA": LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=["base"]),
        "PEFT AdaLoRA": AdaLoraConfig(init_r=r, target_r=r, lora_alpha=16, lora_dropout=0.0, total_step=1000,
                                      target_modules=["base"]),
    }
    layers = {}
    for name, config in configs.items():
        base = nn.Linear(W.shape[1], W.shape[0], device=DEVICE, dtype=W.dtype)
        with torch.no_grad():
            base.weight.copy_(W)
            base.bias.copy_(b)
        model = get_peft_model(_Holder(base), config)
        layers[name] = model.base_model.model.base.to(DEVICE, W.dtype)
    return layers


ADAPTER_CONTENDERS = ("ElaLoRA", "PEFT LoRA", "PEFT AdaLoRA", "eager reference")


def time_adapter(n, d, r, dtype, autocast=None, contenders=ADAPTER_CONTENDERS, base=True):
    """Forward+backward of one adapted layer (x requires grad, as inside a network) against the base alone.

    ``contenders`` and ``base`` choose what is timed, so the headline numbers can come first."""
    import elalora_kernels

    t = adapter_inputs(n, d, d, r, seed=1)
    x = t["x"].to(dtype).requires_grad_()
    W, b = t["W"].to(dtype), t["b"].to(dtype)
    g = t["g"].to(autocast or dtype)
    P, lam, Q = (t[k].to(dtype).requires_grad_() for k in ("P", "lam", "Q"))
    act = t["active"]

    def amp():
        return torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None)

    def base_fb():  # grads returned, not accumulated: no extra add in the timing
        with amp():
            y = torch.nn.functional.linear(x, W, b)
        torch.autograd.grad(y, (x,), g)

    def op_fb(op):
        def run():
            with amp():
                y = op(x, W, b, P, lam, Q, act, 2.0, 0.0, rank=r)
            torch.autograd.grad(y, (x, P, lam, Q), g)
        return run

    def layer_fb(layer):
        params = [p for p in layer.parameters() if p.requires_grad]

        def run():
            with amp():
                y = layer(x)
            torch.autograd.grad(y, [x] + params, g)
        return run

    tag = f"N={n} d={d} r={r} {str(dtype).replace('torch.', '')}{' autocast ' + str(autocast).replace('torch.', '') if autocast else ''}"
    sec = "adapter fwd+bwd"
    with elalora_kernels.use_backend("triton"):
        ms_base, h_base = timed(base_fb)
        if base:
            row(sec, f"base linear alone {tag}", ms_base, h_base)
        layers = peft_layers(W, b, r) if {"PEFT LoRA", "PEFT AdaLoRA"} & set(contenders) else {}
        overheads = {}
        for name in contenders:
            if name in layers and layers[name] is None:
                row(sec, f"{name} {tag}", None, note="peft not installed")
                continue
            fn = {"ElaLoRA": op_fb(elalora_kernels.adapter_linear), "eager reference": op_fb(reference.adapter_linear)}.get(name)
            ms, h = timed(fn or layer_fb(layers[name]))
            overheads[name] = ms - ms_base
            extra = {"target": "<= 1.15x base", "met": ms / ms_base <= 1.15} if name == "ElaLoRA" else {}
            row(sec, f"{'ElaLoRA (triton)' if name == 'ElaLoRA' else name} {tag}", ms, h, x_base=ms / ms_base, **extra)
    if {"ElaLoRA", "PEFT LoRA"} <= overheads.keys():
        ratio = overheads["ElaLoRA"] / max(overheads["PEFT LoRA"], 1e-9)
        row(sec, f"overhead ElaLoRA / PEFT LoRA {tag}", None, ratio=ratio, target="<= 0.5", met=ratio <= 0.5)


def time_nf4_adapter(n, d, r, dtype):
    """Forward+backward of one layer on a bitsandbytes NF4 base (QLoRA; compute dtype ``dtype``): the base
    alone, ElaLoRA (the base computes y0, the Triton adapter_add kernels add the adapter in) and PEFT LoRA's bnb
    layer, at the same r."""
    sec = "adapter fwd+bwd, NF4 base"
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        row(sec, "NF4 base", None, note=f"{err.name} not installed")
        return
    from elalora import ElaLoRALinear

    def nf4_base(seed):
        torch.manual_seed(seed)  # the same weights for every contender
        return bnb.nn.Linear4bit(d, d, compute_dtype=dtype, quant_type="nf4").to(DEVICE)  # moving quantizes

    t = adapter_inputs(n, d, d, r, seed=1)
    x, g = t["x"].to(dtype).requires_grad_(), t["g"].to(dtype)
    elalora_layer = ElaLoRALinear.from_linear(nf4_base(0), r=r, r_max=2 * r)
    holder = _Holder(nf4_base(0))
    holder.is_loaded_in_4bit = True  # PEFT then wraps the base in its bnb.Linear4bit LoRA layer
    peft_layer = get_peft_model(holder, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=["base"])).base_model.model.base
    tag = f"N={n} d={d} r={r} compute {str(dtype).replace('torch.', '')}"

    def fb(layer):
        params = [p for p in layer.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(layer(x), [x] + params, g)

    ms_base, h_base = timed(fb(nf4_base(0)))
    row(sec, f"bitsandbytes NF4 base alone {tag}", ms_base, h_base)
    for name, layer in (("ElaLoRA (triton)", elalora_layer), ("PEFT LoRA (QLoRA)", peft_layer)):
        with use_backend("triton"):  # ElaLoRA's adapter: the Triton kernels' adapter-only mode (PEFT's: its own)
            ms, h = timed(fb(layer))
        row(sec, f"{name} {tag}", ms, h, x_base=ms / ms_base)


# ----------------------------------------------------------------------------- score + EMA
def adapter_set(layers, dims, r_max, dtype, seed=0):
    """params, grads and EMA views of a model's adapters in the allocator's layout (16-byte-aligned views)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params, grads = [], []
    for _ in range(layers):
        for out_f, in_f in dims:
            for shape in ((out_f, r_max), (r_max,), (r_max, in_f)):
                params.append((torch.randn(shape, generator=g) * 0.02).to(DEVICE, dtype))
                grads.append((torch.randn(shape, generator=g) * 1e-3).to(DEVICE, dtype))
    (flat_i, vi), (flat_u, vu) = flat_emas(params, DEVICE), flat_emas(params, DEVICE)
    flat_i.copy_(torch.rand(flat_i.shape, generator=g))
    flat_u.copy_(torch.rand(flat_u.shape, generator=g))
    return params, grads, vi, vu


def check_score_ema(dtype):
    """The allocator's plan on the production layout, and the CUDA C++ kernel, bit for bit."""
    params, grads, vi, vu = adapter_set(2, [(150, 67), (33, 200)] if SMALL else LLAMA_7B[:2], 16, dtype)
    grads[0].view(-1)[3] = float("inf")
    grads[4].view(-1)[1] = float("nan")
    ri, ru = [t.clone() for t in vi], [t.clone() for t in vu]
    n_ref = reference.score_ema_update(params, grads, ri, ru, 0.85, 0.85)
    big = [p.numel() >= score_ema_kernel.BLOCK for p in params]
    impls = [("triton", None)] + ([("cuda", "cuda")] if ON_GPU and cuda_score_ema.extension() is not None else [])
    for name, env in impls:
        fi, fu = [t.clone() for t in vi], [t.clone() for t in vu]
        if env:
            os.environ["ELALORA_SCORE_EMA"] = env
        try:
            plan = ResidentScoreEma(fi, fu)
            plan.update(params, grads, 0.85, 0.85)
            n = plan.read_count()
        finally:
            os.environ.pop("ELALORA_SCORE_EMA", None)
        exact = n == n_ref and all(torch.equal(a, b) for a, b in zip(ri + ru, fi + fu))
        check(f"score_ema ({name})", exact and plan.aligned, dtype=str(dtype), bit_exact=exact, aligned=plan.aligned,
              full_blocks=sum(big), nonfinite=[n, n_ref])
        print(f"  score_ema {name:6s} {str(dtype):15s} bit-identical: {exact}  16-byte aligned: {plan.aligned}  "
              f"tensors >= {score_ema_kernel.BLOCK} elements: {sum(big)}  non-finite {n} (ref {n_ref})")


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


class ScoreEmaTimings:
    """score+EMA over one adapter set: the plan against a device copy first, the other variants later."""

    def __init__(self, layers, dims, r_max, dtype):
        self.params, self.grads, self.vi, self.vu = adapter_set(layers, dims, r_max, dtype, seed=2)
        total = sum(p.numel() for p in self.params)
        self.nbytes = total * (2 * self.params[0].element_size() + 4 * 4)  # read w, g, Ī, Ū; write Ī, Ū
        self.tag = f"{len(self.params)} tensors, {total / 1e6:.1f}M elements, {str(dtype).replace('torch.', '')}"
        self.ms_copy = self.ms_eager = None

    def gbps(self, ms):
        return self.nbytes / (ms * 1e-3) / 1e9

    def row(self, name, ms, host_us=None, **extra):
        if ms:
            extra.update(GBps=self.gbps(ms), of_copy_bw=self.ms_copy / ms if self.ms_copy else None,
                         x_vs_eager=self.ms_eager / ms if self.ms_eager else None)
        row("score+EMA", name, ms, host_us, **extra)

    def plan_and_copy(self):
        src = torch.empty(self.nbytes // 2, dtype=torch.uint8, device=DEVICE)  # a copy reads + writes the same bytes
        dst = torch.empty_like(src)
        self.ms_copy, _ = timed(lambda: dst.copy_(src))
        self.row(f"device copy of the same bytes ({self.nbytes / 1e9:.2f} GB moved)", self.ms_copy)
        plan = ResidentScoreEma(self.vi, self.vu)
        ms, h = timed(lambda: plan.update(self.params, self.grads, 0.85, 0.85))
        self.row(f"triton, prebuilt launch plan ({self.tag})", ms, h, target=">= 80% copy bw", met=self.ms_copy / ms >= 0.8)
        self.cuda_kernel(ms)

    def cuda_kernel(self, ms_triton):
        """The CUDA C++ kernel on the same plan, beside the Triton one: the faster one should ship."""
        if not ON_GPU:
            return
        if cuda_score_ema.extension() is None:
            self.row("CUDA C++ kernel (csrc/cuda)", None, note="not built (elalora_kernels._C_cuda missing)")
            return
        os.environ["ELALORA_SCORE_EMA"] = "cuda"
        try:
            cplan = ResidentScoreEma(self.vi, self.vu)
            ms, h = timed(lambda: cplan.update(self.params, self.grads, 0.85, 0.85))
        finally:
            os.environ.pop("ELALORA_SCORE_EMA")
        self.row("CUDA C++ kernel (csrc/cuda), prebuilt plan", ms, h, ratio=ms_triton / ms,
                 note="ratio: triton ms / CUDA C++ ms (> 1: the CUDA C++ kernel is faster)")

    def variants(self):
        params, grads, vi, vu = self.params, self.grads, self.vi, self.vu

        def eager_loop():  # per-tensor, counts kept on the device: no per-tensor sync
            for w, g, i, u in zip(params, grads, vi, vu):
                reference.score_ema_update_one(w, g, i, u, 0.85, 0.85)

        self.ms_eager, h = timed(eager_loop, reps=2 if SMALL else 5)
        self.row("eager per-tensor loop (no per-tensor sync)", self.ms_eager, h)
        ms, h = timed(lambda: foreach_update(params, grads, vi, vu), reps=2 if SMALL else 5)
        self.row("torch._foreach_* (no non-finite guard)", ms, h)
        if not ON_GPU:
            return
        plan = ResidentScoreEma(vi, vu)
        plan.update(params, grads, 0.85, 0.85)  # the table is uploaded before capture (capture holds the same grads)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                plan.update(params, grads, 0.85, 0.85)
            ms, h = timed(graph.replay)
            self.row("triton plan captured in a CUDA graph", ms, h)
        except Exception as e:  # noqa: BLE001 - a variant must not kill the run
            self.row("triton plan captured in a CUDA graph", None, note=f"failed: {type(e).__name__}: {e}"[:200])

    def compiled(self):
        params, grads, vi, vu = self.params, self.grads, self.vi, self.vu
        one = torch.compile(reference.score_ema_update_one, dynamic=True)

        def run():
            for w, g, i, u in zip(params, grads, vi, vu):
                one(w, g, i, u, 0.85, 0.85)

        t0 = time.perf_counter()
        run()
        sync()
        warm = time.perf_counter() - t0
        ms, h = timed(run, reps=5)
        self.row("torch.compile, per-tensor loop", ms, h, note=f"first call incl. compile {warm:.0f} s")


# ----------------------------------------------------------------------------- host time per step
def host_step_overhead(layers: int, dims, r: int, steps: int):
    """Host µs per RankAllocator.step() with a stub in place of the launch, in three cases:
    steady gradient addresses, every gradient re-allocated every step (zero_grad(set_to_none=True)),
    and the step right after a round."""
    from elalora import ElaLoRAConfig, ElaLoRALinear, RankAllocator

    modules = []
    for _ in range(layers):
        for out_f, in_f in dims:
            base = nn.Linear(1, 1, bias=False, device=DEVICE, dtype=torch.bfloat16)
            # the frozen base is never read by the allocator: a broadcast view stands in for W0 (no memory)
            base.weight = nn.Parameter(torch.zeros((), device=DEVICE, dtype=torch.bfloat16).expand(out_f, in_f),
                                       requires_grad=False)
            modules.append(ElaLoRALinear.from_linear(base, r=r))
    model = nn.Sequential(*modules)

    def allocator(**schedule):
        config = ElaLoRAConfig(r=r, target_modules=".*", total_steps=10**7, **schedule)
        alloc = RankAllocator(model, config)
        alloc.score_plan.launcher = lambda *a: None  # the stub: everything but the launch itself
        return alloc

    def timed_step(alloc) -> float:
        t0 = time.perf_counter()
        alloc.step()
        return (time.perf_counter() - t0) * 1e6

    gen = torch.Generator().manual_seed(0)
    params = [p for layer in modules for p in layer.slot_params()]
    grad_sets = [[(torch.randn(p.shape, generator=gen) * 1e-3).to(DEVICE, p.dtype) for p in params] for _ in range(2)]

    def use_grads(k):
        for p, g in zip(params, grad_sets[k]):
            p.grad = g

    tag = f"{len(params)} tensors ({layers} layers x {len(dims)} matrices, r={r})"
    with use_backend("triton"):
        steady = allocator(t_init=10**6, t_final=1)  # no round
        use_grads(0)
        steady.step()  # builds the table
        us = statistics.median(timed_step(steady) for _ in range(steps))
        row("host", f"RankAllocator.step(), steady gradient addresses, {tag}", None, host_us=us,
            target="<= 100 µs", met=us <= 100, table_writes=steady.score_plan.resident.uploads)
        times = []
        for k in range(steps):  # two sets of gradients, alternating: every address moves every step
            use_grads(k % 2)
            times.append(timed_step(steady))
        us = statistics.median(times)
        row("host", "RankAllocator.step(), every gradient re-allocated every step", None, host_us=us,
            target="<= 100 µs", met=us <= 100, table_writes=steady.score_plan.resident.uploads)
        use_grads(0)
        rounds = allocator(t_init=1, t_final=1, mask_interval=2)
        times = []
        real_scores = tk.rank_scores
        if DEVICE.type == "cpu":  # the round's device kernel is stubbed too, as the launch is: random scores
            tk.rank_scores = lambda ipt, unc: torch.rand(len(ipt), ipt[0][1].numel(), generator=gen)
        back_to_back = []
        try:
            for k in range(-1, max(6, steps // 15)):  # k = -1: a first round and step, not timed
                while not rounds.step().round:
                    pass
                if k < 0:
                    rounds.step()
                elif k % 2:  # as in training: the next backward re-allocates the gradients first
                    use_grads(k // 2 % 2)
                    times.append(timed_step(rounds))
                else:  # nothing in between: the step runs on whatever the round left in the CPU's caches
                    back_to_back.append(timed_step(rounds))
        finally:
            tk.rank_scores = real_scores
        for name, sample in (("gradients re-allocated in between", times), ("back to back", back_to_back)):
            us = statistics.median(sample)
            row("host", f"RankAllocator.step() right after a round, {name}", None, host_us=us, target="<= 100 µs",
                met=us <= 100, rounds=len(rounds.history), table_writes=rounds.score_plan.resident.uploads)
        floor = statistics.median(_time_us(lambda: [p.grad for p in params]) for _ in range(steps))
        row("host", f"for scale: reading the {len(params)} .grad attributes in Python", None, host_us=floor)
    print(f"  host time per allocator.step(): {[round(r_['host_us']) for r_ in ROWS if r_['section'] == 'host']} µs")


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
def table_lines(seconds: float) -> list[str]:
    state = "complete" if STATUS["complete"] else "partial"
    lines = [f"results ({DEVICE_NAME}; {seconds:.0f} s, {state})", "",
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


def tasks():
    """(name, function) in order of importance."""
    host = [("host time per allocator.step()", lambda: host_step_overhead(
        *((2, [(96, 64), (40, 96)], 4, 20) if SMALL else (32, LLAMA_7B, 16, 300))))]
    if ARGS.host_only:
        return host
    if SMALL:
        headline = (64, 96, 16, torch.bfloat16)
        adapter_check = [(7, 200, 150, 13, torch.float32, None), (67, 96, 80, 5, torch.bfloat16, None),
                         (19, 48, 40, 128, torch.bfloat16, None), (33, 64, 48, 8, torch.float32, torch.bfloat16)]
        more_adapter = [(64, 96, 8, torch.bfloat16, None), (64, 96, 16, torch.float32, torch.bfloat16)]
        score_set = (1, [(96, 64), (40, 96)], 16)
    else:
        headline = (8192, 4096, 16, torch.bfloat16)
        adapter_check = [(1024, 1024, 1024, 16, torch.float32, None), (8192, 4096, 4096, 16, torch.bfloat16, None),
                         (67, 4096, 4096, 64, torch.float16, None), (4096, 4096, 4096, 128, torch.bfloat16, None),
                         (4096, 4096, 4096, 16, torch.float32, torch.bfloat16)]
        more_adapter = [(8192, 4096, r, torch.bfloat16, None) for r in (8, 64, 128)]
        more_adapter.append((8192, 4096, 16, torch.float32, torch.bfloat16))
        score_set = (32, LLAMA_7B, 32)  # r = 16, r_max = 2r
    score = {}

    def score_timings() -> ScoreEmaTimings:
        if "t" not in score:
            score["t"] = ScoreEmaTimings(*score_set, torch.bfloat16)
        return score["t"]

    def compile_baseline():
        if SMALL or ARGS.no_compile:
            row("score+EMA", "torch.compile, per-tensor loop", None, note="skipped")
        else:
            score_timings().compiled()

    return [
        ("adapter at the headline shape: base, ElaLoRA, PEFT LoRA",
         lambda: time_adapter(*headline, contenders=("ElaLoRA", "PEFT LoRA"))),
        ("score+EMA: launch plan vs a device copy", lambda: score_timings().plan_and_copy()),
        *host,
        ("correctness: adapter", lambda: [check_adapter(*case) for case in adapter_check]),
        ("correctness: score+EMA", lambda: [check_score_ema(dtype) for dtype in (torch.float32, torch.bfloat16)]),
        ("adapter at the headline shape: PEFT AdaLoRA, eager reference",
         lambda: time_adapter(*headline, contenders=("PEFT AdaLoRA", "eager reference"), base=False)),
        *((f"adapter {case}", lambda case=case: time_adapter(*case)) for case in more_adapter),
        ("adapter on an NF4 base (QLoRA): base, ElaLoRA, PEFT LoRA", lambda: time_nf4_adapter(*headline)),
        ("score+EMA: other variants", lambda: score_timings().variants()),
        ("rank scores", lambda: check_and_time_rank_scores(*score_set)),
        ("score+EMA: torch.compile baseline (cold)", compile_baseline),
    ]


def main():
    print(f"device: {DEVICE_NAME}\ntorch {torch.__version__}, triton {triton.__version__}\n"
          f"time limit {ARGS.time_limit:.0f} s; results written as they come to {OUT}\n")
    save()
    for name, fn in tasks():
        elapsed = time.perf_counter() - T_START
        if elapsed > ARGS.time_limit:
            STATUS["skipped_tasks"].append(name)
            print(f"skipped (time limit {ARGS.time_limit:.0f} s): {name}")
            continue
        print(f"{name} ({elapsed:.0f} s)")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failing task (a PEFT API change, an OOM, a compile error) must not cost the others' numbers
            STATUS["failed_tasks"].append(f"{name}: {type(e).__name__}: {e}"[:1000])
            print(f"  FAILED: {type(e).__name__}: {e}")
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()  # after an OOM, the next task starts with the memory back
        save()
    STATUS["complete"] = True
    save()
    seconds = time.perf_counter() - T_START
    ok = all(c["ok"] for c in CHECKS) and not STATUS["failed_tasks"]
    print("\n" + "\n".join(table_lines(seconds)) + f"\n\nJSON: {OUT}\ntable: {TABLE}")
    if STATUS["failed_tasks"] or STATUS["skipped_tasks"]:
        print(f"failed tasks: {STATUS['failed_tasks']}\nskipped tasks: {STATUS['skipped_tasks']}")
    print(f"all correctness checks ok: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
