"""GPU benchmark of the Triton (and CUDA C++) kernels — one script, ready for any CUDA GPU.

    python benchmarks/gpu.py                 # on a CUDA machine: checks, timings, table, JSON (< 5 min on H100/H200)
    python benchmarks/gpu.py --smoke         # anywhere: tiny shapes under TRITON_INTERPRET=1 on CPU (CI)

1. Checks every kernel against ``elalora_kernels.reference``: the relative
   error of the kernel and of eager PyTorch in the same dtype, both against
   float64, printed side by side; score+EMA must be bit-identical.
2. Times with ``triton.testing.do_bench`` (median):
   * adapter forward+backward (Triton) vs the frozen base linear alone (cuBLAS)
     and vs the eager adapter (``reference.adapter_linear``, PEFT/AdaLoRA style),
     at N = 8192, d = 4096, r in {8, 16, 64}, bf16;
   * score+EMA over a 7B-class adapter set (LLaMA-7B shapes, 32 layers x 7
     projections, r_max = 16, bf16 parameters and gradients, float32 EMAs as
     views of two flat buffers) vs the eager per-tensor loop, a per-tensor
     ``torch.compile`` loop, the CUDA C++ kernel (if built) and a device copy
     of the same number of bytes.
3. Prints a table last and writes JSON (``--json``).

Targets: adapter fwd+bwd <= 1.05x the base linear; score+EMA >= 80% of copy
bandwidth and >= 20x faster than the eager per-tensor loop. In ``--smoke``
mode the numbers are interpreter timings on CPU and mean nothing; the mode
exists to prove that the script runs end to end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 on CPU")
    ap.add_argument("--json", default=None, help="where to write the results (default benchmarks/gpu_results.json; "
                    "with --smoke a file in the temp dir)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from elalora_kernels import reference  # noqa: E402
import elalora_kernels.triton as tk  # noqa: E402
import importlib  # noqa: E402

se = importlib.import_module("elalora_kernels.triton.score_ema")  # the module (the package re-exports the function)

if ARGS.smoke:
    DEVICE = torch.device("cpu")
else:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device (use --smoke to run the tiny interpreter version on CPU)")
    DEVICE = torch.device("cuda")

ROWS: list[dict] = []  # the final table
CHECKS: list[dict] = []


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench(fn) -> float:
    """Median milliseconds per call."""
    if DEVICE.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # interpreter (smoke): a couple of wall-clock runs
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.double()
    return float((a.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


def row(section, name, ms, **extra):
    ROWS.append({"section": section, "name": name, "ms": ms, **extra})


# ----------------------------------------------------------------------------- adapter
def adapter_inputs(n, d_in, d_out, r, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(DEVICE)  # noqa: E731
    return {
        "x": mk(n, d_in), "W": mk(d_out, d_in, std=d_in**-0.5), "b": mk(d_out, std=0.1),
        "P": mk(d_out, 2 * r, std=0.02), "lam": mk(2 * r, std=0.5), "Q": mk(2 * r, d_in, std=0.02),
        "active": torch.ones(2 * r, dtype=torch.bool, device=DEVICE), "g": mk(n, d_out), "r": r, "dtype": dtype,
    }


def adapter_run(fn, t, dtype, backward=True):
    """One call on the layer's slices P[:, :r], λ[:r], Q[:r] (P strided, as ElaLoRALinear passes it)."""
    r = t["r"]
    x = t["x"].to(dtype).clone().requires_grad_(backward)
    P, lam, Q = (t[k].to(dtype).clone().requires_grad_(backward) for k in ("P", "lam", "Q"))
    y = fn(x, t["W"].to(dtype), t["b"].to(dtype), P[:, :r], lam[:r], Q[:r], t["active"][:r], 2.0, 0.0)
    if not backward:
        return {"y": y.detach()}
    y.backward(t["g"].to(dtype))
    return {"y": y.detach(), "dx": x.grad, "dP": P.grad, "dlam": lam.grad, "dQ": Q.grad}


def check_adapter(n, d_in, d_out, r, dtype):
    t = adapter_inputs(n, d_in, d_out, r, dtype)
    t["active"][1] = False  # a gap in the active mask
    exact = adapter_run(reference.adapter_linear, t, torch.float64)
    eager = adapter_run(reference.adapter_linear, t, dtype)
    fast = adapter_run(tk.adapter_linear, t, dtype)
    for k in exact:
        e_fast, e_eager = rel_err(fast[k], exact[k]), rel_err(eager[k], exact[k])
        ok = e_fast <= 2 * e_eager + {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        CHECKS.append({"kernel": "adapter_linear", "output": k, "shape": [n, d_in, d_out, r], "dtype": str(dtype),
                       "rel_err_kernel": e_fast, "rel_err_eager": e_eager, "ok": ok})
        print(f"  adapter {str(dtype):15s} N={n} d={d_in}x{d_out} r={r} {k:5s} rel err vs fp64: "
              f"triton {e_fast:.2e}  eager {e_eager:.2e}  {'ok' if ok else 'FAIL'}")
    del t, exact, eager, fast


def time_adapter(n, d, r, dtype):
    t = adapter_inputs(n, d, d, r, dtype, seed=1)
    x = t["x"].to(dtype).requires_grad_()
    W = t["W"].to(dtype)
    b = t["b"].to(dtype)
    g = t["g"].to(dtype)
    P, lam, Q = (t[k].to(dtype).requires_grad_() for k in ("P", "lam", "Q"))
    act = t["active"]

    def base_fb():  # grads returned, not accumulated: no extra add in the timing
        y = torch.nn.functional.linear(x, W, b)
        torch.autograd.grad(y, (x,), g)

    def make(fn):
        def run():
            y = fn(x, W, b, P[:, :r], lam[:r], Q[:r], act[:r], 2.0, 0.0)
            torch.autograd.grad(y, (x, P, lam, Q), g)
        return run

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(x, W, b, P[:, :r], lam[:r], Q[:r], act[:r], 2.0, 0.0)
        return run

    def base_f():
        with torch.no_grad():
            torch.nn.functional.linear(x, W, b)

    tag = f"N={n} d={d} r={r} {str(dtype).replace('torch.', '')}"
    ms_base = bench(base_fb)
    ms_tri = bench(make(tk.adapter_linear))
    ms_eager = bench(make(reference.adapter_linear))
    row("adapter fwd+bwd", f"base linear (cuBLAS) {tag}", ms_base)
    row("adapter fwd+bwd", f"ElaLoRA triton {tag}", ms_tri, x_base=ms_tri / ms_base, target="<= 1.05x base",
        met=ms_tri / ms_base <= 1.05)
    row("adapter fwd+bwd", f"eager adapter {tag}", ms_eager, x_base=ms_eager / ms_base)
    f_base, f_tri, f_eager = bench(base_f), bench(fwd(tk.adapter_linear)), bench(fwd(reference.adapter_linear))
    row("adapter fwd", f"base linear (cuBLAS) {tag}", f_base)
    row("adapter fwd", f"ElaLoRA triton {tag}", f_tri, x_base=f_tri / f_base)
    row("adapter fwd", f"eager adapter {tag}", f_eager, x_base=f_eager / f_base)
    del t, x, W, b, g, P, lam, Q


# ----------------------------------------------------------------------------- score + EMA
def adapter_set(layers, dims, r_max, dtype, seed=0):
    """params, grads and EMA views (two flat float32 buffers) of a model's adapters, allocator layout."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params, grads = [], []
    for _ in range(layers):
        for out_f, in_f in dims:
            for shape in ((out_f, r_max), (r_max,), (r_max, in_f)):
                params.append((torch.randn(shape, generator=g) * 0.02).to(DEVICE, dtype))
                grads.append((torch.randn(shape, generator=g) * 1e-3).to(DEVICE, dtype))
    total = sum(p.numel() for p in params)
    flat_i = torch.rand(total, generator=g).to(DEVICE)
    flat_u = torch.rand(total, generator=g).to(DEVICE)
    views_i, views_u, off = [], [], 0
    for p in params:
        views_i.append(flat_i[off : off + p.numel()].view(p.shape))
        views_u.append(flat_u[off : off + p.numel()].view(p.shape))
        off += p.numel()
    return params, grads, views_i, views_u, total


def check_score_ema(dtype):
    params, grads, vi, vu, _ = adapter_set(2, [(150, 67), (33, 200)], 5, dtype)
    grads[0].view(-1)[3] = float("inf")
    grads[4].view(-1)[1] = float("nan")
    ri, ru = [t.clone() for t in vi], [t.clone() for t in vu]
    n_ref = reference.score_ema_update(params, grads, ri, ru, 0.85, 0.85)
    impls = [("triton", None)]
    if DEVICE.type == "cuda" and se.cuda_extension() is not None:
        impls.append(("cuda", "cuda"))
    for name, env in impls:
        fi, fu = [t.clone() for t in vi], [t.clone() for t in vu]
        with _score_impl(env):
            n = tk.score_ema_update(params, grads, fi, fu, 0.85, 0.85)
        exact = n == n_ref and all(torch.equal(a, b) for a, b in zip(ri + ru, fi + fu))
        CHECKS.append({"kernel": f"score_ema ({name})", "dtype": str(dtype), "bit_exact": exact,
                       "nonfinite": [n, n_ref], "ok": exact})
        print(f"  score_ema {name:6s} {str(dtype):15s} bit-identical to reference: {exact}  non-finite {n} (ref {n_ref})")


class _score_impl:
    def __init__(self, env):
        self.env = env

    def __enter__(self):
        self.old = os.environ.get("ELALORA_SCORE_EMA")
        if self.env:
            os.environ["ELALORA_SCORE_EMA"] = self.env

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("ELALORA_SCORE_EMA", None)
        else:
            os.environ["ELALORA_SCORE_EMA"] = self.old


def time_score_ema(layers, dims, r_max, dtype, compile_baseline):
    params, grads, vi, vu, total = adapter_set(layers, dims, r_max, dtype, seed=2)
    esz = params[0].element_size()
    nbytes = total * (2 * esz + 4 * 4)  # read w, g, Ī, Ū; write Ī, Ū
    tag = f"{len(params)} tensors, {total / 1e6:.1f}M elements, {str(dtype).replace('torch.', '')}"
    gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731

    ms_tri = bench(lambda: tk.score_ema_update_async(params, grads, vi, vu, 0.85, 0.85))
    ms_tri_sync = bench(lambda: tk.score_ema_update(params, grads, vi, vu, 0.85, 0.85))
    ms_eager = bench(lambda: reference.score_ema_update(params, grads, vi, vu, 0.85, 0.85))
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)  # copy: reads + writes the same bytes
    dst = torch.empty_like(src)
    ms_copy = bench(lambda: dst.copy_(src))
    row("score+EMA", f"device copy of the same bytes ({nbytes / 1e9:.2f} GB moved)", ms_copy, GBps=gbps(ms_copy))
    row("score+EMA", f"triton, one launch ({tag})", ms_tri, GBps=gbps(ms_tri), of_copy_bw=ms_copy / ms_tri,
        x_vs_eager=ms_eager / ms_tri, target=">= 80% copy bw, >= 20x eager",
        met=ms_copy / ms_tri >= 0.8 and ms_eager / ms_tri >= 20)
    row("score+EMA", "triton + host read of the non-finite count", ms_tri_sync, x_vs_eager=ms_eager / ms_tri_sync)
    if DEVICE.type == "cuda" and se.cuda_extension() is not None:
        with _score_impl("cuda"):
            ms_cu = bench(lambda: tk.score_ema_update_async(params, grads, vi, vu, 0.85, 0.85))
        row("score+EMA", "CUDA C++ kernel (csrc/cuda), one launch", ms_cu, GBps=gbps(ms_cu), of_copy_bw=ms_copy / ms_cu,
            x_vs_eager=ms_eager / ms_cu)
    else:
        row("score+EMA", "CUDA C++ kernel (csrc/cuda)", None, note="not built (elalora_kernels._C_cuda missing)")
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
            ms_c = bench(compiled)
            row("score+EMA", "torch.compile, per-tensor loop", ms_c, GBps=gbps(ms_c), x_vs_eager=ms_eager / ms_c,
                note=f"first call incl. compile {warm:.1f} s")
        except Exception as e:  # noqa: BLE001 - a baseline must not kill the run
            row("score+EMA", "torch.compile, per-tensor loop", None, note=f"failed: {type(e).__name__}: {e}"[:200])
    else:
        row("score+EMA", "torch.compile, per-tensor loop", None, note="skipped")
    row("score+EMA", "eager per-tensor loop (reference)", ms_eager, GBps=gbps(ms_eager))


# ----------------------------------------------------------------------------- rank scores
def check_and_time_rank_scores(layers, dims, r_max):
    params, _, vi, vu, _ = adapter_set(layers, dims, r_max, torch.float32, seed=3)
    ipt = [tuple(vi[k : k + 3]) for k in range(0, len(vi), 3)]
    unc = [tuple(vu[k : k + 3]) for k in range(0, len(vu), 3)]
    exact = reference.rank_scores([tuple(t.double() for t in m) for m in ipt], [tuple(t.double() for t in m) for m in unc])
    e_fast = rel_err(tk.rank_scores(ipt, unc), exact)
    e_eager = rel_err(reference.rank_scores(ipt, unc), exact)
    ok = e_fast <= 2 * e_eager + 1e-6
    CHECKS.append({"kernel": "rank_scores", "matrices": len(ipt), "rel_err_kernel": e_fast, "rel_err_eager": e_eager,
                   "ok": ok})
    print(f"  rank_scores {len(ipt)} matrices r_max={r_max}: rel err vs fp64: triton {e_fast:.2e}  eager {e_eager:.2e}"
          f"  {'ok' if ok else 'FAIL'}")
    ms_tri = bench(lambda: tk.rank_scores(ipt, unc))
    ms_eager = bench(lambda: reference.rank_scores(ipt, unc))
    row("rank scores", f"triton, one launch ({len(ipt)} matrices)", ms_tri, x_vs_eager=ms_eager / ms_tri)
    row("rank scores", "eager per-matrix loop (reference)", ms_eager)


# ----------------------------------------------------------------------------- main
def main():
    t_start = time.perf_counter()
    if ARGS.smoke:
        adapter_check = [(7, 200, 150, 13, torch.float32), (67, 96, 80, 5, torch.bfloat16)]
        adapter_time = [(64, 96, r, torch.bfloat16) for r in (8, 16, 64)]
        llama = (1, [(96, 64), (40, 96)], 16)
    else:
        adapter_check = [(1024, 1024, 1024, 16, torch.float32), (8192, 4096, 4096, 16, torch.bfloat16),
                         (67, 4096, 4096, 64, torch.float16)]
        adapter_time = [(8192, 4096, r, torch.bfloat16) for r in (8, 16, 64)]
        llama = (32, [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)], 16)  # LLaMA-7B, r_max 16
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (TRITON_INTERPRET=1, smoke: numbers mean nothing)"
    print(f"device: {name}\ntorch {torch.__version__}, triton {triton.__version__}\n")

    print("correctness vs float64 reference")
    for case in adapter_check:
        check_adapter(*case)
    for dtype in (torch.float32, torch.bfloat16):
        check_score_ema(dtype)
    check_and_time_rank_scores(llama[0], llama[1], llama[2])

    print("\ntiming (median ms)")
    for case in adapter_time:
        time_adapter(*case)
        print(f"  adapter {case} done")
    time_score_ema(llama[0], llama[1], llama[2], torch.bfloat16, compile_baseline=not (ARGS.smoke or ARGS.no_compile))
    print("  score+EMA done")

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "smoke": ARGS.smoke, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "checks": CHECKS, "timings": ROWS,
        "all_checks_ok": all(c["ok"] for c in CHECKS), "seconds": time.perf_counter() - t_start,
    }
    if ARGS.json:
        out = pathlib.Path(ARGS.json)
    elif ARGS.smoke:  # smoke output is not a result: keep it out of the tree
        import tempfile

        out = pathlib.Path(tempfile.gettempdir()) / "elalora_gpu_results_smoke.json"
    else:
        out = ROOT / "benchmarks" / "gpu_results.json"
    out.write_text(json.dumps(results, indent=2, default=str))

    # ---- the table, last
    print(f"\nresults ({name}; {results['seconds']:.0f} s; JSON: {out})")
    print(f"{'section':16s} {'what':72s} {'ms':>10s}  notes")
    for r_ in ROWS:
        ms = f"{r_['ms']:.4f}" if r_["ms"] is not None else "-"
        notes = []
        for k, fmt in (("x_base", "{:.3f}x base"), ("GBps", "{:.0f} GB/s"), ("of_copy_bw", "{:.0%} of copy bw"),
                       ("x_vs_eager", "{:.1f}x faster than eager")):
            if r_.get(k) is not None:
                notes.append(fmt.format(r_[k]))
        if "target" in r_:
            verdict = "n/a (smoke)" if ARGS.smoke else ("met" if r_["met"] else "NOT met")
            notes.append(f"target {r_['target']}: {verdict}")
        if r_.get("note"):
            notes.append(r_["note"])
        print(f"{r_['section']:16s} {r_['name'][:72]:72s} {ms:>10s}  {'; '.join(notes)}")
    print(f"\nall correctness checks ok: {results['all_checks_ok']}")
    return 0 if results["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
