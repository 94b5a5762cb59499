"""Shared helpers of the Triton backend."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from elalora_kernels.limits import MAX_R_MAX

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (tests, ``--smoke``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rank_block(r: int) -> int:
    """Padded rank dimension: a power of two covering ``r``, at least 16 (``tl.dot``'s minimum).

    Kernels take the exact rank as a runtime argument and mask with it, so a
    change of rank recompiles only when it crosses a power of two.
    """
    return max(16, triton.next_power_of_2(max(int(r), 1)))


def check_rank(r: int) -> None:
    if r > MAX_R_MAX:
        raise ValueError(f"elalora_kernels.triton supports ranks up to r_max = {MAX_R_MAX} (got {r} rank slots)")


def check_device(*tensors) -> None:
    for t in tensors:
        if t is not None and not (t.is_cuda or interpreting()):
            raise RuntimeError(
                "elalora_kernels.triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                f"got a tensor on {t.device}"
            )


def launch_guard(device: torch.device):
    """Context for kernel launches on tensors of ``device``.

    Triton launches on the *current* CUDA device, not on its arguments' device:
    a model spread over GPUs (``device_map="auto"``) needs every launch guarded.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small number keeps the program count (and the test time) low, yet splits


# Tests set this to True: every buffer the backend allocates for a kernel to
# fill starts as NaN (integers: -1), so an element a kernel fails to write shows.
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t
