"""benchmarks/gpu.py runs end to end (--smoke: tiny shapes, TRITON_INTERPRET=1, CPU) so it is known to work
before a GPU ever sees it; ``make gpu-check`` runs it even after a failing test."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.subprocess
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
    assert results["complete"] and not results["failed_tasks"] and not results["skipped_tasks"]


@pytest.mark.subprocess
def test_gpu_check_runs_the_benchmark_after_a_failing_test(tmp_path):
    """The first GPU run must produce its numbers even if a GPU test fails: make reports both, then fails."""
    failing = tmp_path / "test_injected.py"
    failing.write_text("def test_injected_failure():\n    assert False, 'injected'\n")
    out = tmp_path / "results.json"
    # not the variables of a make that runs this suite (`make test PYTEST_ARGS=-q` would pass its -q on)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(
        ["make", "-o", ".venv/.elalora-installed", "gpu-check", f"PY={sys.executable}", f"GPU_CHECK_TESTS={failing}",
         f"GPU_CHECK_ARGS=--smoke --host-only --json {out}"],
        cwd=ROOT, env=dict(env, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "1 failed" in proc.stdout and "gpu-check: tests exit 1, benchmark exit 0" in proc.stdout, proc.stdout[-4000:]
    results = json.loads(out.read_text())
    assert results["complete"] and {row["section"] for row in results["timings"]} == {"host"}
    assert out.with_suffix(".md").read_text().startswith("results (")


@pytest.mark.subprocess
def test_a_run_cut_off_by_its_time_limit_keeps_what_it_measured(tmp_path):
    """Results reach the disk as they come; tasks past the time limit are recorded as skipped."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--time-limit", "0", "--json", str(out)],
        cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
    )
    results = json.loads(out.read_text())
    assert results["complete"] and results["timings"] == [] and len(results["skipped_tasks"]) >= 8, proc.stdout[-2000:]
    assert proc.returncode == 0, proc.stdout[-2000:]
