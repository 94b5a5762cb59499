"""The tests mirror the package:

    core/         the method: layer, inject / merge, config, allocator, reallocation, schedule, disable, plots
    io/           saves and loads: save_adapter / load_adapter, atomicity, save_pretrained, PEFT export, checkpoints
    hf/           transformers: the Trainer callback, per-architecture defaults, a full training run
    quantized/    bitsandbytes bases
    reliability/  DDP and FSDP2 (with their worker processes), resume, non-finite input, precision, compile, bad input
    kernels/      elalora_kernels: the torch, CPU and sharded backends against the reference, dispatch, autocast
    triton/       the Triton and CUDA kernels
    project/      the repository around the package: packaging, README, demo, benchmarks

What several folders share sits here, imported by name (pytest's ``pythonpath``): ``fixtures`` (the toy
models and configs), ``_reliability_util``, ``_trainer_run`` and the kernel tests' ``_kernel_*`` helpers.
"""
import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. The variable must
# be set before anything imports triton.language (torch.compile, transformers
# and peft may, while test modules are collected): its standard-library
# functions are built as compiled or interpreted functions at that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fixed_threads_and_seed():
    # Other processes may share the cores: a fixed thread count keeps runs comparable.
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """For tests of tiny models: one thread is faster, and much faster on a busy machine."""
    torch.set_num_threads(1)
    yield
