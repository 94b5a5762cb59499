"""Builds elalora and its compiled kernels.

* ``elalora_kernels._C``: the C++ CPU kernels (csrc/*.cpp), always attempted.
* ``elalora_kernels._C_cuda``: the CUDA kernels (csrc/cuda/*.cu and their
  binding), only when the installed torch has CUDA.

A kernel that fails to build never fails the install: the package then runs
its vectorised torch fallback and says so once at import.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # metadata-only builds (no torch yet): pure Python package
    torch = None


def extensions():
    if torch is None or os.environ.get("ELALORA_NO_EXTENSION") == "1":
        return []
    exts = []
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if cpp:
        exts.append(
            CppExtension(
                "elalora_kernels._C",
                cpp,
                # Portable baseline: no -march=native in what ships; -ffp-contract=off
                # keeps results bit-identical to torch's separate multiply and add.
                extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
                extra_link_args=["-fopenmp"],
            )
        )
    cuda = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if cuda and torch.version.cuda is not None:
        exts.append(CUDAExtension("elalora_kernels._C_cuda", cuda, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    return exts


class OptionalBuildExtension(BuildExtension if torch is not None else object):
    """Builds what it can; a compiler failure leaves the torch fallback in place."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any build failure means "use the fallback"
            print(f"WARNING: could not build {ext.name} ({error}); the torch fallback will be used", file=sys.stderr)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)} if torch is not None else {},
)
