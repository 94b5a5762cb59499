"""Whole MiniLM-L6 training step (36 adapted matrices, batch 32×64, AdamW, orthogonality penalty on)
and the allocator's own per-step and per-round cost.  ~2 s a step.

The three models step in turn, pass by pass, as in bench_cpu_score_ema.py.  Run: pytest benchmarks"""
import functools
import statistics

import pytest

import cpu_cases as C

PASSES = 6


@functools.lru_cache(maxsize=len(C.STEP_IMPLS))
def _train_step(impl):
    return C.train_step(impl)


@pytest.mark.parametrize("impl", C.STEP_IMPLS)
@pytest.mark.parametrize("pass_", range(PASSES))
def test_minilm_training_step(benchmark, pass_, impl):
    ts = _train_step(impl)
    benchmark.group = "MiniLM-L6 training step"
    benchmark.pedantic(ts.step, rounds=1, warmup_rounds=1)
    # The method's own work inside the steps so far (allocator.step / update_and_allocate).
    for key, times in (("bookkeeping_s", ts.bookkeeping), ("round_s", ts.rounds)):
        if times:
            benchmark.extra_info[key] = statistics.median(times)


@functools.lru_cache(maxsize=1)
def _allocator_bench():
    return C.allocator_bench()


@pytest.mark.parametrize("part", ["score update", "round", "rank scores"])
def test_allocator_step(benchmark, part):
    bench = _allocator_bench()
    fn = {"score update": bench.score_step, "round": bench.round_step, "rank scores": bench.rank_scores}[part]
    benchmark.group = "elalora allocator on MiniLM-L6"
    benchmark.pedantic(fn, rounds=40, warmup_rounds=3)
