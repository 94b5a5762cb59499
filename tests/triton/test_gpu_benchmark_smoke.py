"""``make gpu-check`` and benchmarks/gpu.py run end to end (--smoke: tiny shapes, TRITON_INTERPRET=1, CPU) so
they are known to work before a GPU ever sees them: on a machine like a GPU node's (torch and Triton in the
python given as PY, no .venv, no package index), and after a failing test."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _gpu_check(tmp_path, tests: str, bench_args: str) -> subprocess.CompletedProcess:
    """``make gpu-check PY=<this python>`` as on an offline GPU node: no index (pip would fail at once),
    no .venv (VENV points at a path that must stay absent), an inherited TRITON_INTERPRET=1 (cleared)."""
    # not the variables of a make that runs this suite (`make test PYTEST_ARGS=-q` would pass its -q on)
    # (make also exports its command-line variables to the environment: PYTEST_ARGS would arrive that way)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTEST_ARGS")}
    env.update(PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple", TRITON_INTERPRET="1")
    return subprocess.run(
        ["make", "gpu-check", f"PY={sys.executable}", f"VENV={tmp_path / 'venv'}", f"GPU_CHECK_TESTS={tests}",
         f"GPU_CHECK_ARGS={bench_args}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.slow
@pytest.mark.subprocess
def test_gpu_check_on_an_offline_machine_runs_the_smoke_benchmark(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    proc = _gpu_check(tmp_path, "tests/triton/test_launch_count.py",
                      f"--smoke --json {out} --table {tmp_path / 'table.md'}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not (tmp_path / "venv").exists(), "gpu-check made a virtual environment"
    assert "gpu-check: compiled extensions present" in proc.stdout  # the in-place build ran
    assert "gpu-check: tests exit 0, benchmark exit 0" in proc.stdout
    assert "all correctness checks ok: True" in proc.stdout
    results = json.loads(out.read_text())
    assert results["inherited_triton_interpret"] is None, "gpu-check passed TRITON_INTERPRET on"
    assert results["smoke"] and results["all_checks_ok"]
    sections = {row["section"] for row in results["timings"]}
    assert {"adapter fwd+bwd", "score+EMA", "rank scores", "host"} <= sections
    names = " ".join(row["name"] for row in results["timings"])
    for baseline in ("PEFT LoRA", "PEFT AdaLoRA", "device copy", "_foreach_", "eager per-tensor", "prebuilt launch plan"):
        assert baseline in names, baseline
    nf4 = [row["name"] for row in results["timings"] if row["section"] == "adapter fwd+bwd, NF4 base"]
    if importlib.util.find_spec("bitsandbytes") and importlib.util.find_spec("peft"):  # the 4-bit row: Triton's
        assert any(name.startswith("ElaLoRA (triton)") for name in nf4), nf4  # adapter_add
    assert (tmp_path / "table.md").read_text().startswith("results (")
    assert results["complete"] and not results["failed_tasks"] and not results["skipped_tasks"]
    assert not list(tmp_path.glob("*.tmp")), "a results file was left half-written"


@pytest.mark.subprocess
def test_gpu_check_runs_the_benchmark_after_a_failing_test(tmp_path):
    """The first GPU run must produce its numbers even if a GPU test fails: make reports both, then fails."""
    failing = tmp_path / "test_injected.py"
    failing.write_text("def test_injected_failure():\n    assert False, 'injected'\n")
    out = tmp_path / "results.json"
    proc = _gpu_check(tmp_path, str(failing), f"--smoke --host-only --json {out}")
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "1 failed" in proc.stdout and "gpu-check: tests exit 1, benchmark exit 0" in proc.stdout, proc.stdout[-4000:]
    results = json.loads(out.read_text())
    assert results["complete"] and {row["section"] for row in results["timings"]} == {"host"}
    assert out.with_suffix(".md").read_text().startswith("results (")


def test_a_failing_task_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    """Each task is isolated: an exception (a PEFT API change, an OOM, a compile error) is recorded with its
    message and the run goes on; the results on disk are complete after every task."""
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--json", str(tmp_path / "r.json")])
    spec = importlib.util.spec_from_file_location("elalora_gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)  # parses the patched argv, as a fresh run would

    def broken():
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(gpu, "tasks", lambda: [("broken", broken), ("fine", lambda: gpu.row("host", "after", 1.0))])
    assert gpu.main() == 1
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["failed_tasks"] == ["broken: RuntimeError: CUDA out of memory (injected)"]
    assert [row["name"] for row in results["timings"]] == ["after"] and results["complete"]


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


@pytest.mark.parametrize("torch_cuda,nvcc,says", [
    (None, "12.4", "torch has no CUDA"),
    ("12.4", None, "no nvcc found"),
    ("12.4", "11.8", "nvcc is CUDA 11.8 but torch was built with CUDA 12.4"),
    ("12.4", "12.6", "building the CUDA C++ kernel with nvcc 12.6"),  # minor versions are compatible
])
def test_the_build_step_says_what_it_will_build_and_why(torch_cuda, nvcc, says):
    spec = importlib.util.spec_from_file_location("elalora_gpu_build", ROOT / "benchmarks" / "gpu_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.cuda_build_plan(torch_cuda, nvcc).startswith(says)
