"""Count the Triton compilations the adapter kernels would need as ranks and N move — no GPU needed.

Every launch is intercepted: its cache key is computed with the binder Triton
builds for an sm_90 target (the key that decides whether ``JITFunction.run``
compiles) and the launch is skipped. A layer's forward and backward go through
the dispatch layer, as in training: float32 weights, full-size P, λ, Q with the
active rank as a number (as ElaLoRALinear passes them), plain and under bf16
autocast (the kernels then read the float32 parameters and cast inside), and the adapter alone on a
base output y0 (``adapter_add``, a quantized base's path). A round changes the active rank, a new
batch changes N; neither may need a new compilation while the rank stays within one power-of-two
rank block.
Run with TRITON_INTERPRET unset (a subprocess of tests/triton/test_no_recompile.py);
prints the distinct keys per kernel, per mode, as JSON.
"""
from __future__ import annotations

import importlib
import json
import os
from collections import defaultdict

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature  # noqa: E402

import elalora_kernels  # noqa: E402

al = importlib.import_module("elalora_kernels.triton.adapter_linear")
BACKEND = make_backend(GPUTarget("cuda", 90, 32))
keys: dict[str, set] = defaultdict(set)


def record(self, *args, grid, warmup, **kwargs):
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    _, specialization, options = binder(*args, **kwargs)
    keys[self.__name__].add(compute_cache_key({}, specialization, options))


JITFunction.run = record
al.check_device = lambda *tensors: None  # CPU tensors stand in for CUDA ones: no kernel runs

IN, OUT, R_MAX = 96, 80, 32
weight = torch.zeros(OUT, IN)
P_full, lam_full, Q_full = (torch.zeros(s, requires_grad=True) for s in ((OUT, R_MAX), (R_MAX,), (R_MAX, IN)))
active_full = torch.ones(R_MAX, dtype=torch.bool)
counts = {}
for mode in ("plain", "bf16 autocast", "adapter_add"):
    keys.clear()
    for n in (123, 64, 1000, 4097):  # N moves (all >= 32 rows: the row tile is then fixed)
        for r in (17, 24, 31, 32):  # a round moves the active rank within one rank block
            x = torch.zeros(n, IN, requires_grad=True)
            autocast = torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16 autocast")
            with elalora_kernels.use_backend("triton"), autocast:
                if mode == "adapter_add":
                    y = elalora_kernels.adapter_add(torch.zeros(n, OUT, requires_grad=True), x, P_full, lam_full,
                                                    Q_full, active_full, 2.0, rank=r)
                else:
                    y = elalora_kernels.adapter_linear(x, weight, None, P_full, lam_full, Q_full, active_full, 2.0,
                                                       rank=r)
            y.backward(torch.zeros_like(y))
    counts[mode] = {name: len(k) for name, k in keys.items()}
print(json.dumps(counts))
