"""Builds elalora and its optional compiled kernels.

* ``elalora_kernels._C``: the C++ CPU kernels (csrc/*.cpp).
* ``elalora_kernels._C_cuda``: the CUDA kernels (csrc/cuda/), only when the
  installed torch has CUDA and the CUDA toolkit (nvcc) is found.

Both need torch at build time, so install torch first and build with
``pip install --no-build-isolation ...`` (an isolated build would download a
second torch and compile against it). Without torch, or with
``ELALORA_NO_EXTENSION=1``, the package is pure Python.

A kernel that fails to build never fails the install: the package then runs its
vectorised torch fallback. Compiler features are probed first with the compiler
the build uses: no OpenMP flag where it is missing (the kernel then runs on one
thread) and no AVX2 clone where ``target_clones`` is missing.
"""
import glob
import os
import sys
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # metadata-only builds (no torch yet): pure Python package
    torch = None

HOW_TO_FIX = (
    "The compiler's own output above says why. To build it: have a C++17 compiler that torch supports "
    "(e.g. `apt install g++`, or Xcode's command line tools), then reinstall with "
    "`pip install -v --no-build-isolation --no-deps --force-reinstall <this package>`; "
    "or set ELALORA_NO_EXTENSION=1 to skip the build (and the warning at import) on purpose."
)

# Small programs that compile only where the compiler has the feature.
OPENMP_PROBE = "#include <omp.h>\nint probe() { return omp_get_max_threads(); }\n"
TARGET_CLONES_PROBE = '__attribute__((target_clones("avx2", "default"))) int probe(int x) { return x + 1; }\n'


def extensions():
    if torch is None or os.environ.get("ELALORA_NO_EXTENSION") == "1":
        return []
    exts = []
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if cpp:
        # Its flags are chosen in build_extensions, once the compiler has been probed.
        exts.append(CppExtension("elalora_kernels._C", cpp))
    cuda = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if cuda and torch.version.cuda is not None:
        if CUDA_HOME is None:
            print("elalora: torch has CUDA but no CUDA toolkit (nvcc) was found: the CUDA kernels are not built; "
                  "the Triton kernels and the torch fallback serve the GPU.", file=sys.stderr)
        else:
            exts.append(CUDAExtension("elalora_kernels._C_cuda", cuda,
                                      extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    return exts


class OptionalBuildExtension(BuildExtension if torch is not None else object):
    """Builds what it can; a compiler failure leaves the torch fallback in place."""

    def run(self):
        self._failed = set()
        super().run()

    def build_extensions(self):
        try:
            if sys.platform != "win32":  # GCC/Clang flags; MSVC keeps torch's defaults
                self._add_cpu_flags()
            super().build_extensions()  # torch checks the compiler here, then builds each extension
        except Exception as error:  # noqa: BLE001 - no usable compiler: every extension falls back
            self._fall_back([ext.name for ext in self.extensions if ext.name not in self._failed], error)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any build failure means "use the fallback"
            self._fall_back([ext.name], error)

    def _fall_back(self, names, error):
        self._failed.update(names)
        print(f"\nWARNING: elalora could not build {', '.join(names)}: {error}\n"
              f"The package works without it, on its slower torch fallback. {HOW_TO_FIX}\n", file=sys.stderr)

    def _add_cpu_flags(self):
        if not self._compiles("int probe() { return 0; }\n", []):
            raise RuntimeError(f"no working C++ compiler ({' '.join(self.compiler.compiler_so)})")
        openmp = self._compiles(OPENMP_PROBE, ["-fopenmp"], link=True)
        clones = self._compiles(TARGET_CLONES_PROBE, [])
        if not openmp:
            print("elalora: the compiler has no OpenMP; the C++ score+EMA kernel will run on one thread.",
                  file=sys.stderr)
        for ext in self.extensions:
            if ext.name != "elalora_kernels._C":
                continue
            # No -march=native in what ships; -ffp-contract=off keeps results bit-identical
            # to torch's separate multiply and add.
            ext.extra_compile_args = ["-O3", "-ffp-contract=off"]
            ext.extra_link_args = []
            if openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
            if not clones:
                ext.extra_compile_args.append("-DELALORA_NO_TARGET_CLONES")

    def _compiles(self, source, flags, link=False):
        """Whether the build's own compiler accepts ``source`` with ``flags`` (and links it, if asked)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.cpp")
            with open(path, "w") as f:
                f.write(source)
            try:
                objects = self.compiler.compile([path], output_dir=tmp, extra_postargs=["-fPIC", *flags])
                if link:
                    self.compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"), extra_postargs=flags)
            except Exception:  # noqa: BLE001 - CompileError/LinkError: the feature is missing
                return False
        return True

    def copy_extensions_to_source(self):
        # Editable installs copy every built file into the source tree: skip the ones that failed.
        built = [ext for ext in self.extensions if ext.name not in self._failed]
        self.extensions, everything = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = everything

setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)} if torch is not None else {},
)
