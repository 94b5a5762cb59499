"""The backend choice: by device, forced for the process by ELALORA_BACKEND (read once, at import), or at run time."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from elalora_kernels import dispatch


@dispatch.use_backend(None)
def test_default_choice_by_device():
    assert dispatch.backend_for(torch.device("cpu")) == "cpu"
    assert dispatch.backend_for(torch.device("mps")) == "torch"  # no Triton there: the torch-op versions
    assert dispatch.backend_for(torch.device("cuda")) == ("triton" if dispatch._TRITON_INSTALLED else "torch")


def test_use_backend_restores_the_previous_choice():
    before = dispatch.backend_for(torch.device("cpu"))
    with dispatch.use_backend("reference"):
        assert dispatch.backend_for(torch.device("cpu")) == "reference"
        with dispatch.use_backend("torch"):
            assert dispatch.backend_for(torch.device("cpu")) == "torch"
        assert dispatch.backend_for(torch.device("cpu")) == "reference"
    assert dispatch.backend_for(torch.device("cpu")) == before


def test_unknown_backend_is_rejected_and_changes_nothing():
    before = dispatch.backend_for(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"'gpu' is not a backend; expected one of \('reference', 'cpu', 'torch', 'triton'\)"):
        dispatch.set_backend("gpu")
    assert dispatch.backend_for(torch.device("cpu")) == before


def _import_with_env(value: str) -> subprocess.CompletedProcess:
    code = "import torch, elalora_kernels as k; print(k.backend_for(torch.device('cpu')))"
    env = dict(os.environ, ELALORA_BACKEND=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_environment_variable_forces_the_backend_at_import():
    proc = _import_with_env("reference")
    assert proc.returncode == 0 and proc.stdout.strip() == "reference", proc.stderr[-2000:]
    proc = _import_with_env("nonsense")
    assert proc.returncode != 0 and "'nonsense' is not a backend" in proc.stderr


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_score_ema_lists_of_unequal_length_are_an_error_and_change_nothing(backend):
    """A grad missing from the list would otherwise pair every later weight with the wrong EMAs."""
    if backend == "triton":
        pytest.importorskip("triton")
    w = [torch.ones(4), torch.ones(3)]
    ipt, unc = [torch.zeros(4), torch.zeros(3)], [torch.zeros(4), torch.zeros(3)]
    with dispatch.use_backend(backend), pytest.raises(ValueError, match=r"must have the same length \(got 2, 1, 2, 2\)"):
        dispatch.score_ema_update(w, [torch.ones(4)], ipt, unc, 0.85, 0.85)
    assert all(not t.any() for t in ipt + unc)
