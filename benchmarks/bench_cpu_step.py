"""Whole MiniLM-L6 training step (36 adapted matrices, batch 32×64, AdamW, orthogonality penalty on)
and the allocator's own per-step and per-round cost.  Slow (~2 s a step): not part of `make test`.
Run: pytest benchmarks/bench_cpu_step.py"""
import pytest

import cpu_cases as C


@pytest.mark.parametrize("impl", ["elalora", "peft LoRA", "peft AdaLoRA"])
def test_minilm_training_step(benchmark, impl):
    ts = C.train_step(impl)
    benchmark.group = "MiniLM-L6 training step"
    benchmark.pedantic(ts.step, rounds=5, warmup_rounds=2)


@pytest.mark.parametrize("kind", ["score update (every step)", "round (every mask_interval)"])
def test_allocator_step(benchmark, kind):
    bench = C.allocator_bench()
    benchmark.group = "elalora allocator.step on MiniLM-L6"
    fn = bench.score_step if kind.startswith("score") else bench.round_step
    benchmark.pedantic(fn, rounds=30, warmup_rounds=3)
