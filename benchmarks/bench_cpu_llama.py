"""Whole training step of a Llama-shaped causal LM (hidden 512, MLP 1376, 4 layers, 8 heads,
vocabulary 8000; r = 16 on q/k/v/o/gate/up/down; AdamW) at 4×128 and 8×256 tokens: elalora vs
PEFT LoRA vs the frozen floor (no adapter, activation gradients only), in turn pass by pass as in
bench_cpu_step.py; and elalora's own per-step work, part by part.  ~1-3 s a step.

Run alone: make bench PYTEST_ARGS="-k llama"  (or pytest benchmarks -k llama)"""
import functools
import statistics

import pytest

import cpu_cases as C

PASSES = 4


@functools.lru_cache(maxsize=len(C.LLAMA_IMPLS))
def _step(impl, tokens):
    return C.llama_step(impl, tokens)


@pytest.mark.parametrize("impl", C.LLAMA_IMPLS)
@pytest.mark.parametrize("pass_", range(PASSES))
@pytest.mark.parametrize("tokens", list(C.LLAMA_TOKENS))
def test_llama_training_step(benchmark, tokens, pass_, impl):
    ts = _step(impl, tokens)
    benchmark.group = f"Llama-shaped training step {tokens}"
    benchmark.pedantic(ts.step, rounds=3, warmup_rounds=1)
    if ts.bookkeeping:  # allocator.step inside the training steps so far (caches cold after backward + AdamW)
        benchmark.extra_info["bookkeeping_s"] = statistics.median(ts.bookkeeping)


@functools.lru_cache(maxsize=1)
def _extras():
    return C.llama_extras()


PARTS = {
    "orth penalty fwd+bwd": "penalty",
    "orth penalty fwd+bwd, batched torch ops": "penalty_batched",
    "allocator.step, no round": "allocator_step",
    "allocator.step, no round, r_max = r": "allocator_step_active",
    "AdamW, r_max = 2r slots": "adamw_slots",
    "AdamW, r_max = ⌈1.5 r⌉ slots": "adamw_three_halves",
    "AdamW, r slots": "adamw_active",
}


@pytest.mark.parametrize("pass_", range(PASSES))
@pytest.mark.parametrize("part", list(PARTS))
def test_llama_elalora_extra_work(benchmark, pass_, part):
    benchmark.group = "elalora per-step work, Llama-shaped"
    benchmark.pedantic(getattr(_extras(), PARTS[part]), rounds=20, warmup_rounds=2)
