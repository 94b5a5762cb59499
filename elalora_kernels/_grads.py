"""Reading the gradients of many parameters at once."""
from __future__ import annotations

import itertools
import operator
from typing import Sequence

import torch
from torch import Tensor

_GRAD = operator.attrgetter("grad")


def grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    """Every param's grad, zeros where there is none (the GPU path reads them in C++ instead)."""
    grads = list(map(_GRAD, params))
    if any(map(operator.is_, itertools.repeat(None), grads)):  # never `None in grads`: that compares tensors
        grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
    return grads
