"""ElaLoRA on adapters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Outside a module's forward, FSDP2 keeps every adapter parameter as a DTensor
split on dim 0 over a 1-D device mesh with ``torch.chunk`` semantics: P
``[out, r_max]`` by rows, λ ``[r_max]`` and Q ``[r_max, in]`` by slot. Each
process scores and keeps EMAs for its own shards only; this module holds what
needs the other processes (the math on shards is in :mod:`elalora_kernels.sharded`):

* ``AdapterShards.rank_scores``: the ``[matrices, r_max]`` score table from one
  all-reduce of partial sums, so every process plans the same round.
* ``AdapterShards.whole_slots``: a round's slot edits on tensors whose slots
  span processes (one all-gather of the touched layers, written back by rows).
* ``AdapterShards.whole_emas`` / ``load_emas``: allocator state in the
  single-process layout, so checkpoints do not depend on the world size.
* ``orth_penalty``: the orthogonality penalty from one all-gather per step.
* ``full`` / ``copy_whole_into`` / ``is_writer`` for saving and loading adapters.

A model that is not sharded never reaches this module (``is_sharded`` is False
without even importing ``torch.distributed.tensor``).
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from elalora_kernels import sharded
from elalora_kernels.sharded import shard_rows


def _dtensor_type():
    # A DTensor exists only once torch.distributed.tensor is imported: checking
    # sys.modules keeps its (slow) import away from unsharded runs.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(t) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """This process's shard of ``t`` (``t`` itself when not sharded); shares ``t``'s memory."""
    if not is_sharded(t):
        return t
    with torch.no_grad():
        return t.to_local()


def full(t: Tensor) -> Tensor:
    """The whole of ``t`` on every process (a collective when ``t`` is sharded)."""
    return t.full_tensor() if is_sharded(t) else t


def is_writer(t: Tensor) -> bool:
    """Whether this process writes files for ``t``'s shards (the first process of its mesh)."""
    return not is_sharded(t) or t.device_mesh.get_local_rank() == 0


@torch.no_grad()
def copy_whole_into(param: Tensor, whole: Tensor) -> None:
    """``param.copy_(whole)`` where ``param`` may be sharded: each process copies its own rows."""
    if not is_sharded(param):
        param.copy_(whole)
        return
    mesh = param.device_mesh
    start, stop = shard_rows(param.shape[0], mesh.size(), mesh.get_local_rank())
    param.to_local().copy_(whole[start:stop])


class AdapterShards:
    """How the adapters of one allocator are split over the processes of one FSDP2 mesh."""

    def __init__(self, layers: Sequence, params: Sequence[Tensor]) -> None:
        n_sharded = sum(is_sharded(p) for p in params)
        if n_sharded != len(params):
            raise ValueError(
                f"RankAllocator: {n_sharded} of {len(params)} adapter parameters are FSDP2 shards; "
                "shard all adapters (fully_shard every block holding one, then the root) or none"
            )
        from torch.distributed.tensor import Shard

        meshes = {p.device_mesh for p in params}
        mesh = meshes.pop()
        if meshes or mesh.ndim != 1:
            raise ValueError("RankAllocator: FSDP2 adapters must share one 1-D device mesh (HSDP is not supported)")
        placements = {tuple(p.placements) for p in params}
        if placements != {(Shard(0),)}:
            found = sorted(map(str, placements))
            raise ValueError(f"RankAllocator: FSDP2 adapters must be sharded on dim 0 (found {found})")
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.r_max = layers[0].r_max
        self.out_features = [layer.out_features for layer in layers]
        for p in params:
            start, stop = self.rows(p.shape[0])
            if local(p).shape[0] != stop - start:
                raise ValueError(
                    f"RankAllocator: an adapter shard holds {local(p).shape[0]} rows, expected {stop - start} "
                    "(torch.chunk layout of fully_shard's default Shard(0))"
                )

    def rows(self, n: int) -> tuple[int, int]:
        return shard_rows(n, self.world, self.rank)

    # ------------------------------------------------------------- scores
    def weights_and_grads(self, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Local shards of the parameters and of their gradients (zeros where there is none)."""
        weights = [local(p) for p in params]
        grads = [local(p.grad) if p.grad is not None else torch.zeros_like(w) for p, w in zip(params, weights)]
        return weights, grads

    def rank_scores(self, ipt: Sequence[Sequence[Tensor]], unc: Sequence[Sequence[Tensor]]) -> Tensor:
        """docs/ALGORITHM.md §3 on shards, the same float32 [M, r_max] table on every process:
        one all-reduce of every process's float64 [3, M, r_max] part (``elalora_kernels.sharded``)."""
        parts = sharded.rank_score_parts(ipt, unc, self.world, self.rank)
        dist.all_reduce(parts, group=self.group)
        return sharded.rank_scores_from_parts(parts, self.out_features)

    # ------------------------------------------------------------- rounds
    @contextlib.contextmanager
    def whole_slots(
        self, tensors: dict[int, list[tuple[Tensor, int]]], expanding: set[int]
    ) -> Iterator[dict[int, list[tuple[Tensor, int]]]]:
        """A round's per-slot tensors (layer -> [(tensor, slot dim)], parameters P, λ, Q first),
        whole where the round needs them whole.

        λ, Q and their EMAs and moments are split by slot, so a swap or a new
        slot may span processes: they are gathered (one all-gather for the
        round), edited whole and identically on every process, and each process
        copies its own rows back on exit. P's EMAs and moments hold every slot
        of their rows and are edited in place, as is P itself unless the layer
        gains a rank, whose direction must be orthogonal to the whole of P.
        """
        picked = [
            (m, i)
            for m, entries in tensors.items()
            for i, (_, dim) in enumerate(entries)
            if dim == 0 or (i == 0 and m in expanding)
        ]
        lengths = [self.r_max if tensors[m][i][1] == 0 else self.out_features[m] for m, i in picked]
        wholes = self.gather([tensors[m][i][0] for m, i in picked], lengths)
        work = {m: list(entries) for m, entries in tensors.items()}
        for (m, i), whole in zip(picked, wholes):
            work[m][i] = (whole, tensors[m][i][1])
        yield work
        for (m, i), whole, n in zip(picked, wholes, lengths):
            start, stop = self.rows(n)
            tensors[m][i][0].copy_(whole[start:stop])

    def gather(self, shards: Sequence[Tensor], lengths: Sequence[int]) -> list[Tensor]:
        """Whole tensors from every process's dim-0 shards (``lengths``: whole dim-0 sizes), one all-gather.

        The shards travel as bytes, so tensors of any dtypes share one collective,
        each padded to the largest shard of its tensor.
        """
        if not shards:
            return []
        chunks = [-(-n // self.world) for n in lengths]
        row_bytes = [math.prod(s.shape[1:]) * s.element_size() for s in shards]
        offsets = [0]
        for chunk, nbytes in zip(chunks, row_bytes):
            offsets.append(offsets[-1] + chunk * nbytes)
        send = torch.zeros(offsets[-1], dtype=torch.uint8, device=shards[0].device)
        for shard, start in zip(shards, offsets):
            data = shard.detach().contiguous().reshape(-1).view(torch.uint8)
            send[start : start + data.numel()] = data
        received = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(received, send, group=self.group)
        wholes = []
        for shard, n, nbytes, start in zip(shards, lengths, row_bytes, offsets):
            pieces = []
            for rank, buffer in enumerate(received):
                lo, hi = shard_rows(n, self.world, rank)
                raw = buffer[start : start + (hi - lo) * nbytes]
                pieces.append(raw.view(shard.dtype).view(hi - lo, *shard.shape[1:]))
            wholes.append(torch.cat(pieces))
        return wholes

    # -------------------------------------------------------------- state
    def whole_emas(
        self, view_sets: Sequence[Sequence[Tensor]], params: Sequence[Tensor], offsets: Sequence[int]
    ) -> list[Tensor]:
        """The flat EMA buffers a single process would hold (``offsets``: its layout), one all-gather."""
        rows = [p.shape[0] for p in params] * len(view_sets)
        wholes = iter(self.gather([v for views in view_sets for v in views], rows))
        flats = []
        for _ in view_sets:
            flat = torch.zeros(offsets[-1], dtype=torch.float32, device=view_sets[0][0].device)
            for start, whole in zip(offsets[:-1], wholes):
                flat[start : start + whole.numel()] = whole.reshape(-1)
            flats.append(flat)
        return flats

    def load_emas(self, flat: Tensor, views: Sequence[Tensor], params: Sequence[Tensor], offsets: Sequence[int]):
        """Copy this process's rows of a single-process flat EMA buffer into its views."""
        for view, p, start in zip(views, params, offsets):
            whole = flat[start : start + p.numel()].view(p.shape)
            lo, hi = self.rows(p.shape[0])
            view.copy_(whole[lo:hi])


# ------------------------------------------------------------ penalty
class _AllGatherUsedAlike(torch.autograd.Function):
    """All-gather of equal-sized pieces into [world, n] that every process then uses
    identically (same values, same ops): the output gradient is then the same on
    every process, and the gradient of a process's piece is its own row of it.
    This is the gradient of the mean of the per-process losses, as FSDP averages."""

    @staticmethod
    def forward(ctx, piece: Tensor, group, world: int, rank: int) -> Tensor:
        received = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(received, piece.contiguous(), group=group)
        ctx.rank = rank
        return torch.stack(received)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.rank], None, None, None


def orth_penalty(layers: Sequence, coeff: float) -> Tensor:
    """docs/ALGORITHM.md §6 on FSDP2 shards, the same float32 scalar on every process: one all-gather
    per call of every process's piece (``elalora_kernels.sharded``: partial Gram matrices of P, shards of Q)."""
    n_sharded = sum(is_sharded(layer.lora_P) for layer in layers)
    if n_sharded != len(layers):
        raise RuntimeError(
            f"orth_penalty: {n_sharded} of {len(layers)} adapters are sharded right now and the others are not "
            "(an FSDP2 module that keeps its parameters unsharded after forward, such as the root, holds them); "
            "fully_shard each block that holds adapters"
        )
    mesh = layers[0].lora_P.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    ranks = [layer.active_rank for layer in layers]
    piece = sharded.orth_penalty_piece(
        [layer.lora_P.to_local() for layer in layers], [layer.lora_Q.to_local() for layer in layers], ranks, world
    )
    pieces = _AllGatherUsedAlike.apply(piece, mesh.get_group(), world, rank)
    return sharded.orth_penalty_from_pieces(
        pieces, ranks, [layer.r_max for layer in layers], [layer.in_features for layer in layers], coeff
    )
