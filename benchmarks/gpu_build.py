"""``make gpu-check``, first step: check this python's torch and Triton, then build the compiled kernels in place.

A GPU machine's python usually has CUDA torch and Triton already, and often no network: nothing is
installed here and no virtual environment is made. ``setup.py build_ext --inplace`` builds
``elalora_kernels._C`` (CPU) and, where torch has CUDA and nvcc exists, ``elalora_kernels._C_cuda``
next to the sources. When nvcc's CUDA major version differs from torch's, torch refuses the CUDA build:
this says so before building, and the run goes on with the Triton kernels, which need no build.

Exits 2 when torch or Triton cannot be imported (nothing else can run), else 0: a failed build leaves
the package on its Triton and torch kernels, which is what most users run anyway.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def nvcc_release(cuda_home: str | None) -> str | None:
    """The CUDA release of the nvcc torch would build with (``CUDA_HOME``'s, else the one on PATH)."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def cuda_build_plan(torch_cuda: str | None, nvcc: str | None) -> str:
    """One line: what the build will do about the CUDA kernel, and why."""
    if torch_cuda is None:
        return "torch has no CUDA: building the CPU extension only"
    if nvcc is None:
        return "no nvcc found: the CUDA C++ score+EMA kernel is not built; the Triton kernels serve the GPU"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc is CUDA {nvcc} but torch was built with CUDA {torch_cuda}: torch refuses to build the CUDA "
                "C++ kernel with it, so only the Triton kernels will run (point CUDA_HOME at a CUDA "
                f"{torch_cuda.split('.')[0]}.x toolkit to build it)")
    return f"building the CUDA C++ kernel with nvcc {nvcc} (torch's CUDA: {torch_cuda})"


def main() -> int:
    try:
        import torch
        import triton
    except ImportError as error:
        print(f"gpu-check: {sys.executable} cannot import {error.name}. Run it with a python that has CUDA torch "
              "and Triton: make gpu-check PY=/path/to/python")
        return 2
    from torch.utils.cpp_extension import CUDA_HOME

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"gpu-check: {sys.executable}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton.__version__}, GPU: {gpu}")
    print("gpu-check: " + cuda_build_plan(torch.version.cuda, nvcc_release(CUDA_HOME)))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                           capture_output=True, text=True)
    if build.returncode != 0:  # setup.py itself failed (no setuptools, ...): the kernels that need no build remain
        print(f"gpu-check: the in-place build failed (exit {build.returncode}); going on with Triton:\n"
              + (build.stdout + build.stderr)[-3000:])
    built = sorted(p.name.split(".")[0] for p in (ROOT / "elalora_kernels").glob("_C*.so"))
    print(f"gpu-check: compiled extensions present: {', '.join(built) or 'none'}")
    for line in (build.stdout + build.stderr).splitlines():  # setup.py's own explanations of what it skipped
        if line.startswith("elalora:") or "mismatches the version" in line:
            print("gpu-check: " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
