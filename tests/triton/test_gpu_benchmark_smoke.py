"""benchmarks/gpu.py runs end to end (--smoke: tiny shapes, TRITON_INTERPRET=1, CPU) so it is known to work
before a GPU ever sees it."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out), "--table", str(tmp_path / "table.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all correctness checks ok: True" in proc.stdout
    results = json.loads(out.read_text())
    assert results["smoke"] and results["all_checks_ok"]
    sections = {row["section"] for row in results["timings"]}
    assert {"adapter fwd+bwd", "score+EMA", "rank scores", "host"} <= sections
    names = " ".join(row["name"] for row in results["timings"])
    for baseline in ("PEFT LoRA", "PEFT AdaLoRA", "device copy", "_foreach_", "eager per-tensor", "prebuilt launch plan"):
        assert baseline in names, baseline
    assert (tmp_path / "table.md").read_text().startswith("results (")
    # the table is printed last
    assert proc.stdout.rstrip().splitlines()[-1].startswith("all correctness checks ok")
