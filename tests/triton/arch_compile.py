"""Compile every Triton kernel configuration the dispatcher can choose, for every GPU architecture
users train on, with Triton's own compiler and ptxas — no GPU needed.

For sm_75 (T4), sm_80 (A100), sm_86 (RTX 30xx, A10), sm_89 (RTX 40xx, L4) and sm_90 (H100/H200):
every dtype the architecture supports (no bfloat16 on sm_75: the ops fall back to torch there) and
every rank block up to elalora_kernels.limits.MAX_R_MAX, with the launch configuration
(tiles, warps, stages) the launch helpers choose for that architecture's shared memory. Each
compiled kernel's shared memory is checked against the architecture's limit, and its PTX is
read: 16-byte vector loads and no FMA contraction in score+EMA, tensor-core MMAs for
bf16/fp16 from sm_80 on (Triton's dots on sm_75 use FMA) and no TF32 for fp32 in the adapter kernels. The compilations run in parallel
processes and Triton caches them on disk, so a second run is quick.

Run with TRITON_INTERPRET unset (a subprocess of tests/triton/test_arch_compile.py); prints one
line per kernel and a summary per architecture; exits 1 on any failure.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from elalora_kernels.limits import MAX_R_MAX  # noqa: E402
from elalora_kernels.triton._common import SHARED_MEMORY  # noqa: E402

# (the package re-exports functions of the same names as these modules)
al = importlib.import_module("elalora_kernels.triton.adapter_linear")
rs = importlib.import_module("elalora_kernels.triton.rank_scores")
se = importlib.import_module("elalora_kernels.triton.score_ema_kernel")

ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}
RANK_BLOCKS = [16 << k for k in range((MAX_R_MAX // 16).bit_length())]  # 16, 32, ..., MAX_R_MAX
ROW_COUNTS = (1, 8192)  # N <= 16 and large N: the row tile is the only thing N changes


def signatures(p: str, w: str) -> dict:
    """Kernel signatures with compute-dtype pointers ``p`` and parameter (P, λ, Q) pointers ``w``."""
    return {
        "fwd": {"x_ptr": p, "q_ptr": w, "lam_ptr": w, "act_ptr": "*i1", "p_ptr": w, "base_ptr": p, "y_ptr": p,
                "xq_ptr": "*fp32", "N": "i32", "IN": "i32", "OUT": "i32", "R": "i32", "stride_xn": "i32",
                "stride_qr": "i32", "stride_qk": "i32", "stride_lam": "i32", "stride_act": "i32", "stride_po": "i32",
                "stride_pr": "i32", "stride_basen": "i32", "stride_yn": "i32", "scale": "fp32",
                "TILES_PER_PROG": "i32"},
        "bwd dx": {"g_ptr": p, "p_ptr": w, "q_ptr": w, "lam_ptr": w, "act_ptr": "*i1", "xq_ptr": "*fp32",
                   "u_ptr": "*fp32", "dlam_part_ptr": "*fp32", "counter_ptr": "*i32", "dlam_ptr": w, "dx_ptr": p,
                   "N": "i32", "IN": "i32", "OUT": "i32", "R": "i32", "R_MAX": "i32", "M_TILES": "i32",
                   "stride_gn": "i32", "stride_po": "i32", "stride_pr": "i32", "stride_qr": "i32", "stride_qk": "i32",
                   "stride_lam": "i32", "stride_act": "i32", "stride_dxn": "i32", "scale": "fp32",
                   "TILES_PER_PROG": "i32"},
        "tn": {"a_ptr": p, "b_ptr": "*fp32", "lam_ptr": w, "act_ptr": "*i1", "part_ptr": "*fp32", "counter_ptr": "*i32",
               "grad_ptr": w, "N": "i32", "C": "i32", "R": "i32", "R_MAX": "i32", "stride_an": "i32",
               "stride_lam": "i32", "stride_act": "i32", "stride_gc": "i32", "stride_gr": "i32", "scale": "fp32",
               "ROWS_PER_SPLIT": "i32", "SPLITS": "i32"},
    }


def jobs():
    """(arch, name, kernel, signature, constexprs, options, aligned pointers, PTX checks) of every configuration."""
    out = set()
    for (major, minor), shared in SHARED_MEMORY.items():
        arch = 10 * major + minor
        # "bf16+fp32": bf16 compute on float32 parameters (autocast), cast inside the kernels; its tiles
        # are fp32's (the same fit), so the smallest and largest rank blocks show that it compiles
        for dt in ("fp32", "fp16", "bf16", "bf16+fp32") if arch >= 80 else ("fp32", "fp16", "fp16+fp32"):
            compute, params = dt.split("+") if "+" in dt else (dt, dt)
            ieee = dt == "fp32"
            common = (("IEEE", ieee), ("UPCAST", False))
            for br in RANK_BLOCKS if compute == params else (RANK_BLOCKS[0], RANK_BLOCKS[-1]):
                for n in ROW_COUNTS:
                    bm, bk, bn, warps, stages = al._blocks_rows(n, br, max(ELEM[compute], ELEM[params]), shared)
                    tiles = (("BLOCK_M", bm), ("BLOCK_K", bk), ("BLOCK_N", bn), ("BLOCK_R", br))
                    opts = (("num_warps", warps), ("num_stages", stages))
                    out.add((arch, f"adapter fwd {dt} BLOCK_R={br} BLOCK_M={bm}", "fwd", dt,
                             tiles + common + (("STORE_XQ", True),), opts, ("x_ptr", "base_ptr", "y_ptr", "xq_ptr")))
                    # dx: added into g·W0 (adapter_linear), or the adapter's alone (adapter_add, dropout's dxd)
                    for accum in (True, False):
                        out.add((arch, f"adapter bwd dx {dt} BLOCK_R={br} BLOCK_M={bm} ACCUM={accum}", "bwd dx", dt,
                                 tiles + common + (("WRITE_DX", True), ("ACCUM", accum)), opts, ("g_ptr", "dx_ptr")))
                bc, bnn, warps, stages = al._blocks_tn(br, ELEM[compute], shared)
                for scale_b in (True, False):
                    out.add((arch, f"adapter tn {dt} BLOCK_R={br} SCALE_B={scale_b}", "tn", dt,
                             (("BLOCK_C", bc), ("BLOCK_N", bnn), ("BLOCK_R", br)) + common + (("SCALE_B", scale_b),),
                             (("num_warps", warps), ("num_stages", stages)), ("a_ptr", "b_ptr", "part_ptr")))
            for aligned in (True, False) if compute == params else ():
                out.add((arch, f"score_ema {dt} aligned={aligned}", "score_ema", dt,
                         (("W_DTYPE", dt), ("G_DTYPE", dt), ("BLOCK", se.BLOCK), ("ALIGNED", aligned)),
                         (("num_warps", 8),), ("ptrs", "numels", "blocks", "count")))
        for br in RANK_BLOCKS:
            tile = max(16, min(256, 8192 // br))
            out.add((arch, f"rank_scores BLOCK_R={br}", "rank_scores", "fp32",
                     (("BLOCK_R", br), ("BLOCK_K", tile), ("BLOCK_O", tile)), (("num_warps", 4),), ()))
    return sorted(out)


KERNELS = {"fwd": al._fwd_kernel, "bwd dx": al._bwd_dx_kernel, "tn": al._tn_kernel,
           "score_ema": se._score_ema_kernel, "rank_scores": rs._rank_scores_kernel}
OTHER_SIGNATURES = {
    "score_ema": {"ptrs": "*i64", "numels": "*i64", "blocks": "*i64", "count": "*i32", "beta1": "fp32",
                  "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32"},
    "rank_scores": {"table": "*i64", "out_ptr": "*fp32", "R": "i32"},
}
TY = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def compile_one(job) -> tuple[int, str, bool, str]:
    """(arch, name, ok, what was found)."""
    arch, name, kind, dt, constexprs, options, ptr_args = job
    compute, params = dt.split("+") if "+" in dt else (dt, dt)
    sig = dict(OTHER_SIGNATURES.get(kind) or signatures("*" + compute, "*" + params)[kind])
    constexprs = {k: TY[v] if k.endswith("_DTYPE") else v for k, v in constexprs}
    for k in constexprs:
        sig[k] = "constexpr"
    attrs = {(list(sig).index(a),): [["tt.divisibility", 16]] for a in ptr_args}
    fp_fusion = kind not in ("score_ema", "rank_scores")
    try:
        src = ASTSource(KERNELS[kind], sig, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={**dict(options), "enable_fp_fusion": fp_fusion})
    except Exception as e:  # noqa: BLE001
        return arch, name, False, f"{type(e).__name__}: {str(e)[:1500]}"
    limit = SHARED_MEMORY[divmod(arch, 10)]
    shared, ptx = k.metadata.shared, k.asm["ptx"]
    problems = [f"shared memory {shared} > {limit}"] if shared > limit else []
    if kind == "score_ema":
        if ("ld.global.v4" in ptx) != constexprs["ALIGNED"]:
            problems.append("16-byte vector loads missing in the aligned kernel (or present in the other)")
        if re.search(r"\bfma\.rn\.f32", ptx):
            problems.append("FMA contraction")
    elif kind != "rank_scores":
        if dt == "fp32" and ".tf32" in ptx:
            problems.append("TF32 in an fp32 kernel")
        if compute != "fp32" and arch >= 80 and not re.search(r"\b(wgmma|mma)\.", ptx):  # sm_75: Triton's dots use FMA
            problems.append("no tensor-core MMA")
    return arch, name, not problems, f"shared memory {shared} of {limit} bytes" + "".join(f"; {p}" for p in problems)


def main() -> int:
    all_jobs = jobs()
    failures = 0
    peak: dict[int, int] = {}
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for arch, name, ok, what in pool.map(compile_one, all_jobs):
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {name}: {what}", flush=True)
            if ok:
                peak[arch] = max(peak.get(arch, 0), int(what.split()[2]))
    for arch, most in sorted(peak.items()):
        print(f"sm_{arch}: largest shared memory {most} of {SHARED_MEMORY[divmod(arch, 10)]} bytes")
    print(f"{len(all_jobs)} configurations, failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
