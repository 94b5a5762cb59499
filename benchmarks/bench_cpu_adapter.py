"""Adapter linear forward+backward: ours vs PEFT LoRA, PEFT AdaLoRA and the frozen nn.Linear alone.

Contenders alternate pass by pass, as in bench_cpu_score_ema.py.  Run: pytest benchmarks"""
import functools

import pytest

import cpu_cases as C

PASSES = 5


@functools.lru_cache(maxsize=len(C.ADAPTER_IMPLS))  # one shape's contenders at a time
def _case(impl, n, d, r):
    return C.adapter_case(impl, n, d, r)


@pytest.mark.parametrize("impl", C.ADAPTER_IMPLS)
@pytest.mark.parametrize("pass_", range(PASSES))
@pytest.mark.parametrize("n,d,r", C.ADAPTER_SHAPES, ids=str)
def test_adapter_forward_backward(benchmark, n, d, r, pass_, impl):
    step = _case(impl, n, d, r)
    benchmark.group = f"adapter fwd+bwd N={n} d={d} r={r}"
    benchmark.pedantic(step, rounds=1 if n * d > 4_000_000 else 3, warmup_rounds=1)
