"""The Triton kernels compile for sm_90 with Triton's own compiler and ptxas (no GPU needed)."""
from __future__ import annotations

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


@pytest.mark.skipif(not _ptxas_available(), reason="no ptxas (neither Triton's bundled one nor on PATH)")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton" / "sm90_compile.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "failures: 0" in proc.stdout
