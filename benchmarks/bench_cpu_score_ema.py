"""Score+EMA over every adapter tensor (docs/ALGORITHM.md §2): ours vs PEFT's update_ipt, a compiled in-place
eager loop, and two copies of the same bytes (the memory floor), at 1 and 2 threads.

Contenders alternate: a pass times each of them in turn, so load from other processes hits all alike;
benchmarks/compare.py takes the median over passes of the per-pass ratios.  Run: pytest benchmarks"""
import functools

import pytest
import torch

import cpu_cases as C

PASSES = 7


@functools.lru_cache(maxsize=len(C.SCORE_IMPLS))  # one adapter set's contenders at a time
def _case(impl, set_name):
    return C.SCORE_IMPLS[impl](set_name)


@pytest.mark.parametrize("impl", list(C.SCORE_IMPLS))
@pytest.mark.parametrize("pass_", range(PASSES))
@pytest.mark.parametrize("threads", sorted({1, C.THREADS}))
@pytest.mark.parametrize("set_name", list(C.SCORE_SETS))
def test_score_ema(benchmark, set_name, threads, pass_, impl):
    fn, total = _case(impl, set_name)
    torch.set_num_threads(threads)
    benchmark.group = f"score+EMA {set_name}, {threads} threads"
    benchmark.extra_info["elements"] = total
    if hasattr(fn, "compile_s"):
        benchmark.extra_info["compile_s"] = fn.compile_s
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
