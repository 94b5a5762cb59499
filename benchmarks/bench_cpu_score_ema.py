"""Score+EMA over every adapter tensor (docs/ALGORITHM.md §2): ours vs PEFT's update_ipt, a compiled in-place
eager loop, and a copy of the same bytes.  Run: pytest benchmarks/bench_cpu_score_ema.py"""
import pytest

import cpu_cases as C


@pytest.mark.parametrize("impl", list(C.SCORE_IMPLS))
@pytest.mark.parametrize("set_name", list(C.SCORE_SETS))
def test_score_ema(benchmark, set_name, impl):
    fn, total = C.SCORE_IMPLS[impl](set_name)
    benchmark.group = f"score+EMA {set_name}"
    benchmark.extra_info["elements"] = total
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s at 24 B/elem"] = 24 * total / benchmark.stats.stats.median / 1e9
