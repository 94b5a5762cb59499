"""Adapter linear forward+backward: ours vs PEFT LoRA, PEFT AdaLoRA and the frozen nn.Linear alone.
Run: pytest benchmarks/bench_cpu_adapter.py"""
import pytest

import cpu_cases as C


@pytest.mark.parametrize("impl", C.ADAPTER_IMPLS)
@pytest.mark.parametrize("n,d,r", C.ADAPTER_SHAPES, ids=lambda v: str(v))
def test_adapter_forward_backward(benchmark, n, d, r, impl):
    step = C.adapter_case(impl, n, d, r)
    benchmark.group = f"adapter fwd+bwd N={n} d={d} r={r}"
    benchmark.pedantic(step, rounds=7 if n * d > 4_000_000 else 15, warmup_rounds=2)
