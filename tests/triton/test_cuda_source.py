"""csrc/cuda/score_ema.cu is plain CUDA C++: it compiles with nvcc for sm_90 wherever nvcc exists."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CU = ROOT / "csrc" / "cuda" / "score_ema.cu"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_score_ema_cu_compiles_to_ptx(tmp_path):
    out = tmp_path / "score_ema.ptx"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", "-O3", str(CU), "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    assert "score_ema_kernel" in ptx
    assert re.search(r"ld\.global\.[\w.]*v4\.f32", ptx), "no 16-byte vector loads in the aligned path"
    assert "fma.rn.f32" not in ptx, "FMA contraction would break bit-exactness with torch"


def test_chunk_matches_python_tables():
    """The CUDA kernel walks the Python-built chunk table: both must agree on the chunk size."""
    header = (ROOT / "csrc" / "cuda" / "score_ema.h").read_text()
    chunk = int(re.search(r"kScoreEmaChunk = (\d+)", header).group(1))
    kernel = pytest.importorskip("elalora_kernels.triton.score_ema_kernel")
    assert kernel.BLOCK == chunk
