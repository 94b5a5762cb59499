"""Every Triton kernel configuration compiles, and fits the shared memory, for every GPU architecture
users train on (sm_75, sm_80, sm_86, sm_89, sm_90) with Triton's compiler and ptxas (no GPU needed),
and each architecture gets configurations chosen for its shared memory."""
from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not _ptxas_available(), reason="no ptxas (neither Triton's bundled one nor on PATH)")
def test_every_configuration_compiles_for_every_architecture():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton" / "arch_compile.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, "\n".join(l for l in proc.stdout.splitlines() if l.startswith("FAIL"))[-4000:] + proc.stderr[-2000:]
    assert "failures: 0" in proc.stdout
    for arch in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90"):
        assert f"{arch}: largest shared memory" in proc.stdout


def test_configurations_are_chosen_per_architecture(monkeypatch):
    """Less shared memory: narrower tiles or fewer stages; sm_90 keeps the widest that fit it."""
    from elalora_kernels.triton import _common

    al = importlib.import_module("elalora_kernels.triton.adapter_linear")
    monkeypatch.setattr(al, "interpreting", lambda: False)  # the GPU configurations, not the interpreter's
    limits = sorted(set(_common.SHARED_MEMORY.values()))
    for elem in (4, 2):
        for br in (16, 32, 64, 128, 256):
            widths = [bk * bn * stages for _, bk, bn, _, stages in (al._blocks_rows(8192, br, elem, s) for s in limits)]
            assert widths == sorted(widths), (elem, br, widths)
            widths = [bc * bn * stages for bc, bn, _, stages in (al._blocks_tn(br, elem, s) for s in limits)]
            assert widths == sorted(widths), (elem, br, widths)
    assert al._blocks_rows(8192, 256, 4, 65536) != al._blocks_rows(8192, 256, 4, 232448)
