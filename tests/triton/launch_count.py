"""Counts the kernel launches a piece of code issues on a GPU, or would issue, on a CPU under the Triton interpreter.

The rule (issue 29): every Triton launch counts 1; every outermost ATen op that
is not a view counts 1 (autocast's casts reach the dispatcher as ops of their
own, so each counts 1); ``slice_backward`` counts 2 (a zero fill and a copy).
Ops that allocate without writing (``empty``) launch nothing and count 0. The
ops inside a custom op (``elalora::``) and inside a Triton launch's host
bookkeeping are seen through: the custom op is not a launch, what it runs is.
"""
from __future__ import annotations

import contextlib

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction

from elalora_kernels.triton import _common

_NO_LAUNCH = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
_TWO_LAUNCHES = {"slice_backward"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches: list[str] = []  # one name per launch, in order
        self._in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("elalora::"):  # see through: run its Python body with the counter on
            with self:
                return custom_ops.OPDEFS[name]._init_fn(*args, **kwargs)
        if not self._in_triton:
            op = func._opname
            if not func.is_view and op not in _NO_LAUNCH:
                self.launches += [op] * (2 if op in _TWO_LAUNCHES else 1)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def counting_triton(self):
        # where a launch goes: the interpreter's grid executor on CPU, the JIT function's run on a GPU
        owner, method, name_of = (
            (interpreter.GridExecutor, "__call__", lambda launcher: launcher.fn.__name__) if _common.interpreting()
            else (JITFunction, "run", lambda launcher: launcher.__name__)
        )
        original = getattr(owner, method)
        counter = self

        def launch(launcher, *args, **kwargs):
            counter.launches.append(f"triton:{name_of(launcher)}")
            counter._in_triton += 1  # the interpreter's copies of the arguments are no launches
            try:
                return original(launcher, *args, **kwargs)
            finally:
                counter._in_triton -= 1

        setattr(owner, method, launch)
        try:
            with self:
                yield self
        finally:
            setattr(owner, method, original)


def count_launches(fn) -> list[str]:
    """The launches ``fn()`` issues (names, in order)."""
    counter = LaunchCounter()
    with counter.counting_triton():
        fn()
    return counter.launches
