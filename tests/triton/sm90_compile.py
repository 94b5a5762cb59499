"""Compile every Triton kernel of elalora_kernels.triton for sm_90 (H100/H200), no GPU needed.

The interpreter checks what the kernels compute; this checks that the real
compiler accepts them (dot shapes, types, layouts), that each fits sm_90's
shared memory (up to the largest rank block), and looks at the PTX: 16-byte vector loads in the aligned score+EMA kernel, tensor-core MMAs for
bf16/fp16, no TF32 for fp32. Run with TRITON_INTERPRET unset (a subprocess
of tests/triton/test_sm90_compile.py). Prints one line per kernel; exits 1 on
any failure.
"""
from __future__ import annotations

import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import importlib  # noqa: E402

# (the package re-exports functions of the same names as these modules)
al = importlib.import_module("elalora_kernels.triton.adapter_linear")
rs = importlib.import_module("elalora_kernels.triton.rank_scores")
se = importlib.import_module("elalora_kernels.triton.score_ema")

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
TY = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
failures = 0


def compile_(name, fn, sig, constexprs, num_warps=4, fp_fusion=True, ptr_args=()):
    global failures
    full = dict(sig)
    for k in constexprs:
        full[k] = "constexpr"
    attrs = {(list(full).index(a),): [["tt.divisibility", 16]] for a in ptr_args}
    try:
        src = ASTSource(fn, full, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion})
        shared = k.metadata.shared
        check(name, shared <= SM90_SHARED, f"shared memory {shared} bytes (sm_90 allows {SM90_SHARED})")
        return k.asm["ptx"]
    except Exception as e:  # noqa: BLE001
        failures += 1
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
        return None


def check(name, ok, what):
    global failures
    if not ok:
        failures += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {what}")


# score + EMA
for dt, aligned in (("fp32", True), ("fp32", False), ("bf16", True)):
    if True:
        sig = {"ptrs": "*i64", "numels": "*i64", "blocks": "*i64", "count": "*i32",
               "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32"}
        ptx = compile_(f"score_ema {dt} aligned={aligned}", se._score_ema_kernel, sig,
                       {"W_DTYPE": TY[dt], "G_DTYPE": TY[dt], "BLOCK": se.BLOCK, "ALIGNED": aligned},
                       num_warps=8, fp_fusion=False, ptr_args=("ptrs", "numels", "blocks", "count"))
        if ptx is not None:
            v4 = "ld.global.v4" in ptx
            fma = bool(re.search(r"\bfma\.rn\.f32", ptx))
            check(f"score_ema {dt} aligned={aligned}", (v4 == aligned) and not fma,
                  f"16-byte vector loads={v4}, fma contraction={fma}")

# adapter forward / backward / split-N reduction
# representative configurations, up to the largest rank block (elalora_kernels.limits.MAX_R_MAX)
for dt, br in (("fp32", 16), ("bf16", 64), ("fp16", 16), ("bf16", 128), ("bf16", 256), ("fp32", 256)):
    p = "*" + dt
    if True:
        bm, bk, bn, warps = al._blocks_rows(8192, br)  # the launch configuration a GPU would get
        ieee = dt == "fp32"
        common = {"IEEE": ieee, "UPCAST": False}
        sig = {"x_ptr": p, "q_ptr": p, "lam_ptr": p, "act_ptr": "*i1", "p_ptr": p, "y_ptr": p, "xq_ptr": "*fp32",
               "N": "i32", "IN": "i32", "OUT": "i32", "R": "i32",
               "stride_xn": "i32", "stride_qr": "i32", "stride_qk": "i32", "stride_lam": "i32", "stride_act": "i32",
               "stride_po": "i32", "stride_pr": "i32", "stride_yn": "i32", "scale": "fp32", "TILES_PER_PROG": "i32"}
        ptxs = [compile_(f"adapter fwd {dt} BLOCK_R={br}", al._fwd_kernel, sig,
                         {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_R": br, **common,
                          "STORE_XQ": True, "ACCUM": True}, num_warps=warps, ptr_args=("x_ptr", "y_ptr", "xq_ptr"))]
        sig = {"g_ptr": p, "p_ptr": p, "q_ptr": p, "lam_ptr": p, "act_ptr": "*i1", "xq_ptr": "*fp32", "u_ptr": "*fp32",
               "dlam_ptr": "*fp32", "dx_ptr": p, "N": "i32", "IN": "i32", "OUT": "i32", "R": "i32",
               "stride_gn": "i32", "stride_po": "i32", "stride_pr": "i32", "stride_qr": "i32", "stride_qk": "i32",
               "stride_lam": "i32", "stride_act": "i32", "stride_dxn": "i32", "scale": "fp32", "TILES_PER_PROG": "i32"}
        ptxs.append(compile_(f"adapter bwd dx {dt} BLOCK_R={br}", al._bwd_dx_kernel, sig,
                             {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_R": br, **common,
                              "WRITE_DX": True, "ACCUM": True}, num_warps=warps, ptr_args=("g_ptr", "dx_ptr")))
        sig = {"a_ptr": p, "b_ptr": "*fp32", "lam_ptr": p, "act_ptr": "*i1", "out_ptr": "*fp32", "N": "i32", "C": "i32",
               "R": "i32", "stride_an": "i32", "stride_lam": "i32", "stride_act": "i32", "stride_os": "i32",
               "stride_oc": "i32", "stride_or": "i32", "scale": "fp32", "ROWS_PER_SPLIT": "i32"}
        bc, bnn, tn_warps = al._blocks_tn(br)
        ptxs.append(compile_(f"adapter tn {dt} BLOCK_R={br}", al._tn_kernel, sig,
                             {"BLOCK_C": bc, "BLOCK_N": bnn, "BLOCK_R": br, **common, "SCALE_B": True},
                             num_warps=tn_warps, ptr_args=("a_ptr", "b_ptr", "out_ptr")))
        for name, ptx in zip(("fwd", "bwd dx", "tn"), ptxs):
            if ptx is None:
                continue
            mma = bool(re.search(r"\b(wgmma|mma)\.", ptx))
            tf32 = ".tf32" in ptx
            if ieee:
                check(f"adapter {name} {dt} BLOCK_R={br}", not tf32, f"no TF32 (ieee fp32), mma={mma}")
            else:
                check(f"adapter {name} {dt} BLOCK_R={br}", mma, f"tensor-core mma={mma}")

# rank scores
for br in (32,):
    ptx = compile_(f"rank_scores BLOCK_R={br}", rs._rank_scores_kernel, {"table": "*i64", "out_ptr": "*fp32", "R": "i32"},
                   {"BLOCK_R": br, "BLOCK_K": max(16, min(256, 8192 // br)), "BLOCK_O": max(16, min(256, 8192 // br))},
                   fp_fusion=False)
    if ptx is not None:
        check(f"rank_scores BLOCK_R={br}", True, "compiles")

print("failures:", failures)
sys.exit(1 if failures else 0)
