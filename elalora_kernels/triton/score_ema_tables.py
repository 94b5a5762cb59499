"""The device tables one score+EMA launch reads (the ``multi_tensor_apply`` idea with a device pointer table).

* ``ptrs``   int64 [T, 4]: addresses of (w, g, Ī, Ū) of each tensor;
* ``numels`` int64 [T];
* ``blocks`` int64 [B, 2]: (tensor index, first element) of each program.

Both kinds are cached for the per-call op: the block tables per tuple of
sizes, the pointer tables per tuple of addresses. The allocator's per-step
update (:mod:`.resident_score_ema`) owns its tables instead.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from .score_ema_kernel import BLOCK

_CACHE_SIZE = 8


@dataclass
class LaunchTables:
    """What one launch over a group of tensors of one (w, g) dtype pair reads."""

    ptrs: Tensor
    numels: Tensor
    blocks: Tensor
    w_dtype: torch.dtype
    g_dtype: torch.dtype
    aligned: bool  # every address 16-byte aligned

    @property
    def device(self) -> torch.device:
        return self.ptrs.device


_blocks_by_sizes: "OrderedDict[tuple, tuple[Tensor, Tensor]]" = OrderedDict()
_tables_by_addresses: "OrderedDict[tuple, LaunchTables]" = OrderedDict()


def _cached(cache: OrderedDict, key, make):
    """``cache[key]``, made by ``make()`` on a miss; the least recently used entries go beyond ``_CACHE_SIZE``."""
    if key not in cache:
        cache[key] = make()
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def block_tables(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The ``numels`` and ``blocks`` tables of tensors of these sizes, on ``device``."""

    def make():
        counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
        tid = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        start = (torch.arange(tid.numel(), dtype=torch.int64) - first[tid]) * BLOCK
        blocks = torch.stack([tid, start], dim=1).contiguous()
        return torch.tensor(numels, dtype=torch.int64).to(device), blocks.to(device)

    return _cached(_blocks_by_sizes, (numels, str(device)), make)


def tables_for(group: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> LaunchTables:
    """The tables of a group of (w, g, Ī, Ū) of one dtype pair, cached by their addresses."""
    addrs = [t.data_ptr() for quad in group for t in quad]
    numels = tuple(quad[0].numel() for quad in group)
    w, g = group[0][:2]

    def make():
        numel_table, blocks = block_tables(numels, w.device)
        ptrs = torch.tensor(addrs, dtype=torch.int64).view(-1, 4).to(w.device)
        return LaunchTables(ptrs, numel_table, blocks, w.dtype, g.dtype, all(a % 16 == 0 for a in addrs))

    return _cached(_tables_by_addresses, (tuple(addrs), numels, str(w.device), w.dtype, g.dtype), make)
