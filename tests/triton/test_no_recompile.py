"""Rank and batch changes never recompile a Triton kernel, and a compiled model traces the Triton ops."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from elalora import ElaLoRALinear
from elalora_kernels import use_backend

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.subprocess
def test_rank_and_batch_changes_compile_each_kernel_once():
    """Launch keys (what decides a compilation) across 4 batch sizes x 4 ranks of one rank block, sm_90 target,
    with and without autocast, and for the adapter alone on a base output (adapter_add)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton" / "count_compiles.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    # _tn runs in two configurations (dP with the λ scaling, dQ without): two keys, never more
    once = {"_fwd_kernel": 1, "_bwd_dx_kernel": 1, "_tn_kernel": 2}
    assert counts == {"plain": once, "bf16 autocast": once, "adapter_add": once}


@pytest.mark.slow
@use_backend("triton")
def test_compiled_layer_traces_triton_ops_without_graph_breaks_or_recompiles(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ElaLoRALinear(24, 20, r=3, r_max=6).to(device)
    with torch.no_grad():
        layer.lora_lam.normal_()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(2, 5, 24, device=device)
    layer(x)  # on a CPU machine the Triton backend loads at its first (eager) use
    for rank in (3, 5, 2):  # rounds move the rank up and down
        layer.set_active_rank(rank)
        grads = []
        for model in (compiled, layer):
            layer.zero_grad(set_to_none=True)
            y = model(x)
            (y * torch.linspace(-1, 1, 20, device=device)).sum().backward()
            grads.append([y.detach()] + [p.grad.clone() for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times across rank changes"
