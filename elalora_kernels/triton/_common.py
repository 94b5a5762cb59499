"""Shared helpers of the Triton backend."""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from elalora_kernels.limits import MAX_R_MAX, KernelFallbackWarning

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


# Shared memory one block may use (opt-in maximum), by compute capability: H100/H200, A100,
# RTX 30xx/A10/A40, RTX 40xx/L4/L40, T4. The kernels' configurations are chosen to fit it.
SHARED_MEMORY = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (7, 5): 65536}


@functools.lru_cache(maxsize=None)
def _properties(device: torch.device):
    return torch.cuda.get_device_properties(device)


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a block may use on ``device`` (the interpreter: sm_90's)."""
    if device.type != "cuda":
        return SHARED_MEMORY[(9, 0)]
    props = _properties(device)
    known = SHARED_MEMORY.get((props.major, props.minor), min(SHARED_MEMORY.values()))
    return getattr(props, "shared_memory_per_block_optin", None) or known


def capability(device: torch.device) -> tuple[int, int] | None:
    return (_properties(device).major, _properties(device).minor) if device.type == "cuda" else None


def check_dtype_supported(device: torch.device, dtype: torch.dtype) -> None:
    """bfloat16 needs sm_80 or newer (a T4, sm_75, has none): raised inside a launch, the op falls back."""
    cap = capability(device)
    if dtype == torch.bfloat16 and cap is not None and cap < (8, 0):
        raise NotImplementedError(f"bfloat16 kernels need sm_80 or newer; this GPU is sm_{cap[0]}{cap[1]}")


_FAILED: dict[tuple, str] = {}  # (op, configuration) -> why its Triton kernel was given up, for this process


def run_or_fall_back(key: tuple, launch, fallback):
    """``launch()``; if a Triton kernel of ``key`` = (op, configuration...) fails to compile or launch,
    warn once naming the cause and run ``fallback()`` (torch ops) for that key from then on.

    A user's GPU may lack what a kernel needs (shared memory, an instruction, a dtype):
    a training run should slow down, not die.
    """
    if key not in _FAILED:
        try:
            return launch()
        except torch.OutOfMemoryError:  # torch ops would need the memory too
            raise
        except Exception as error:  # noqa: BLE001 - any compile or launch failure
            cause = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"elalora: the Triton kernel for {' '.join(map(str, key))} failed to compile or launch "
                f"({cause[:1000]}); using torch ops for it from now on",
                KernelFallbackWarning,
                stacklevel=3,
            )
            _FAILED[key] = cause
    return fallback()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _properties(device).multi_processor_count
    return 4  # interpreter: a small number keeps the program count (and the test time) low, yet splits


# Tests set this to True: every buffer the backend allocates for a kernel to
# fill starts as NaN (integers: -1), so an element a kernel fails to write shows.
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


_COUNTERS: dict = {}  # (device, stream) -> int32 arrival counters, all 0 between launches


def counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` arrival counters for the in-kernel reductions on ``device``'s current stream.

    Each kernel that uses them leaves them at 0, so one zero-filled buffer per stream
    serves every launch after it (launches on one stream never overlap). Allocated once,
    generously, so that a CUDA graph captured later does not allocate it inside the capture.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if capturing(device):
            raise RuntimeError(
                "elalora: the adapter kernels' counters must exist before CUDA graph capture: "
                "run one training step eagerly on this stream first"
            )
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is being captured into a CUDA graph (nothing may be
    allocated for the first time or uploaded from the host then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
