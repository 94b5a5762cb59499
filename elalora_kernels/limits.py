"""Limits the fast kernels are built for, shared by the kernels and the layer's checks."""

# The Triton adapter kernels hold a row tile × the whole (padded) rank block in
# registers and stage Q/P tiles of that width in shared memory; configurations
# up to a 256-wide block fit sm_90 (tests/triton/sm90_compile.py reports the
# shared memory of each). ElaLoRA's ranks are far below this.
MAX_R_MAX = 256
