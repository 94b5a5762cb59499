"""Count the Triton compilations the adapter kernels would need as ranks and N move — no GPU needed.

Every launch of the real launch helpers is intercepted: its cache key is
computed with the binder Triton builds for an sm_90 target (the key that
decides whether ``JITFunction.run`` compiles) and the launch is skipped. A
round changes the active rank, a new batch changes N; neither may need a new
compilation while the rank stays within one power-of-two rank block. Run with
TRITON_INTERPRET unset (a subprocess of tests/triton/test_no_recompile.py);
prints the distinct keys per kernel as JSON.
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

al = importlib.import_module("elalora_kernels.triton.adapter_linear")
BACKEND = make_backend(GPUTarget("cuda", 90, 32))
keys: dict[str, set] = defaultdict(set)


def record(self, *args, grid, warmup, **kwargs):
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    _, specialization, options = binder(*args, **kwargs)
    keys[self.__name__].add(compute_cache_key({}, specialization, options))


JITFunction.run = record

IN, OUT, R_MAX = 96, 80, 32
weight = torch.zeros(OUT, IN)
P_full, lam_full, Q_full = torch.zeros(OUT, R_MAX), torch.zeros(R_MAX), torch.zeros(R_MAX, IN)
active_full = torch.ones(R_MAX, dtype=torch.bool)
for n in (123, 64, 1000, 4097):  # N moves (all >= 32 rows: the row tile is then fixed)
    for r in (17, 24, 31, 32):  # a round moves the active rank within one rank block
        x = torch.zeros(n, IN)
        g = torch.zeros(n, OUT)
        P, lam, Q, active = P_full[:, :r], lam_full[:r], Q_full[:r], active_full[:r]
        y, xq = al._fwd_op(x, None, weight, None, P, lam, Q, active, 2.0, True)
        al._bwd_op(g, x, None, weight, P, lam, Q, active, xq, 2.0, True, False, True, True, True)
print(json.dumps({name: len(k) for name, k in keys.items()}))
