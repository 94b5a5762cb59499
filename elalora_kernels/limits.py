"""Limits the fast kernels are built for, shared by the kernels and the layer's checks."""

# The Triton adapter kernels hold a row tile × the whole (padded) rank block in
# registers and stage Q/P tiles of that width in shared memory; every rank block
# up to this one has a configuration that fits each supported GPU's shared memory
# (tests/triton/arch_compile.py compiles them all). ElaLoRA's ranks are far below this.
MAX_R_MAX = 256


class KernelFallbackWarning(RuntimeWarning):
    """A fast kernel could not compile or launch on this GPU (or does not support its dtype there):
    the op runs with torch ops instead. Warned once per op and configuration, naming the cause."""
