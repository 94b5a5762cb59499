"""RankAllocator: importance scores every step, prune + expand rounds on schedule.

Call ``step()`` once per optimizer step, after ``optimizer.step()`` and before
``optimizer.zero_grad()``. A round changes values in place (parameters, the
``active`` buffers, EMAs and, given the optimizer, its per-parameter state) and
never a shape, so optimizers, DDP, ``torch.compile`` and outside references
stay valid. Active slots are kept packed at the front of every layer: a pruned
slot swaps places with the layer's last active slot, moving its parameters,
EMAs and optimizer state with it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

import elalora_kernels

from . import fsdp
from .config import ElaLoRAConfig
from .layer import ElaLoRALinear
from .model import adapter_layers
from .reallocation import plan_round
from .schedule import Phase, budget, is_round_step, phase

logger = logging.getLogger("elalora")

STATE_VERSION = 1


@dataclass
class RoundRecord:
    """What one reallocation round did."""

    step: int
    budget: int
    pruned: dict[str, int] = field(default_factory=dict)  # layer name -> ranks removed
    expanded: dict[str, int] = field(default_factory=dict)  # layer name -> ranks added
    passed_over: list[str] = field(default_factory=list)  # full layers skipped for expansion
    ranks: list[int] = field(default_factory=list)  # every layer's rank after the round

    @property
    def moved(self) -> int:
        return sum(self.pruned.values())


@dataclass
class StepInfo:
    """What one ``RankAllocator.step`` did."""

    t: int
    phase: Phase
    round: Optional[RoundRecord] = None
    skipped: bool = False  # the optimizer skipped this step, so the allocator did too
    _nonfinite: Union[int, Callable[[], int]] = field(default=0, repr=False)

    @property
    def nonfinite(self) -> int:
        """Gradient elements whose ``|w·g|`` was inf/nan; their EMAs were left unchanged.

        On the CPU this step's count. On a GPU the count accumulates on the device
        and is read when asked: the first read syncs once and returns the elements
        counted since the previous read (a round reads it, so after a round it is 0).
        """
        if callable(self._nonfinite):
            self._nonfinite = self._nonfinite()
        return self._nonfinite


class RankAllocator:
    """The ElaLoRA rank allocator for every ElaLoRALinear of ``model``.

    ``total_steps`` overrides ``config.total_steps`` (one of them is required).
    Given ``optimizer``, a round zeroes the optimizer state of exactly the
    slots it re-initialises and moves the state of kept slots with them.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ElaLoRAConfig,
        optimizer: torch.optim.Optimizer | None = None,
        total_steps: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RankAllocator expects an nn.Module as model, got {type(model).__name__}")
        if not isinstance(config, ElaLoRAConfig):
            raise TypeError(f"RankAllocator expects an ElaLoRAConfig, got {type(config).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"RankAllocator: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        total_steps = total_steps if total_steps is not None else config.total_steps
        if total_steps is None:
            raise ValueError("RankAllocator: total_steps is required (pass it or set config.total_steps)")
        self.config = config.for_run(total_steps)  # the schedule fields left None follow from total_steps
        named = adapter_layers(model)
        if not named:
            raise ValueError("RankAllocator: model has no ElaLoRALinear layers (call elalora.inject first)")
        self.names = [n for n, _ in named]
        self.layers: list[ElaLoRALinear] = [m for _, m in named]
        for layer in self.layers:
            layer.has_allocator = True
        r_maxes = {layer.r_max for layer in self.layers}
        if len(r_maxes) != 1:
            raise ValueError(f"RankAllocator: every layer must share one r_max, found {sorted(r_maxes)}")
        self.r_max = r_maxes.pop()
        if self.r_max != config.r_max:
            raise ValueError(
                f"RankAllocator: the layers have r_max = {self.r_max} but config.r_max = {config.r_max}; "
                "build the allocator with the config the model was injected with"
            )
        devices = {layer.lora_lam.device for layer in self.layers}
        if len(devices) != 1:
            raise ValueError(f"RankAllocator: adapters must be on one device, found {sorted(map(str, devices))}")
        self.optimizer = optimizer
        self.t = 0
        self.history: list[RoundRecord] = []
        self.generator = torch.Generator().manual_seed(config.seed)

        self.params: list[Tensor] = [p for layer in self.layers for p in layer.slot_params()]
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [
                f"{name}.{attr}"
                for name, layer in zip(self.names, self.layers)
                for (attr, _), p in zip(ElaLoRALinear.SLOTS, layer.slot_params())
                if id(p) not in held
            ]
            if missing:
                raise ValueError(
                    f"RankAllocator: optimizer does not hold {len(missing)} adapter parameters "
                    f"(first: {missing[:3]}); pass the optimizer that trains this model's adapters"
                )
        # Under FSDP2 every process scores and keeps EMAs for its own shards only.
        sharded = any(fsdp.is_sharded(p) for p in self.params)
        self._shards = fsdp.AdapterShards(self.layers, self.params) if sharded else None
        shards = [fsdp.local(p) for p in self.params]
        device = devices.pop()
        self.ema_ipt, self._ipt_views = flat_emas(shards, device)
        self.ema_unc, self._unc_views = flat_emas(shards, device)
        # The per-step update of these EMAs (benchmarks set its `launcher` to time the host work alone).
        self.score_plan = elalora_kernels.ScoreEmaPlan(self._ipt_views, self._unc_views, self.config.beta1, self.config.beta2)
        self._nonfinite_seen = 0  # non-finite elements counted and already brought to the host

    # ------------------------------------------------------------ each step
    def step(self, *, optimizer_skipped: bool = False) -> StepInfo:
        """Update the scores and, on a round step, reallocate ranks.

        With ``optimizer_skipped=True`` (e.g. a GradScaler overflow step) it
        does nothing at all, not even advance its step counter, so the run
        takes the same decisions as one without that step.
        """
        if not isinstance(optimizer_skipped, bool):
            raise TypeError(f"RankAllocator.step: optimizer_skipped must be a bool (got {type(optimizer_skipped).__name__})")
        t = self.t
        info = StepInfo(t=t, phase=phase(t, self.config), skipped=optimizer_skipped)
        if optimizer_skipped:
            return info
        if any(map(_MERGED, self.layers)):  # C-level: no Python work per layer in a step
            raise RuntimeError("RankAllocator.step: unmerge the adapters before training")
        if info.phase != Phase.STABLE:
            if self._shards is None:
                nonfinite = self.score_plan.update(self.params)  # reads the grads itself (on a GPU, in C++)
            else:
                nonfinite = self.score_plan.update(*self._shards.weights_and_grads(self.params))
            if nonfinite is None:  # on the device: read when asked, and at rounds (which sync anyway)
                info._nonfinite = self._read_device_nonfinite
            else:
                info._nonfinite = nonfinite
                self._nonfinite_seen += nonfinite
                _warn_nonfinite(nonfinite, f"at step {t}")
            if is_round_step(t, self.config):
                info.round, counted = self._round(t, budget(t, self.config))
                self.history.append(info.round)
                if nonfinite is None:  # the device count came to the host with the round's scores
                    info._nonfinite = counted
                    _warn_nonfinite(counted, f"since the last read (up to step {t})")
        self.t = t + 1
        return info

    def _read_device_nonfinite(self) -> int:
        count = self.score_plan.read_nonfinite()
        self._nonfinite_seen += count
        return count

    def nonfinite_total(self) -> int:
        """Non-finite gradient elements seen since this allocator was built (EMAs left unchanged).

        For loggers: on a GPU this is the one read (one sync) of the device count, so
        reading it at log steps instead of ``StepInfo.nonfinite`` every step keeps steps sync-free.
        """
        self._read_device_nonfinite()
        return self._nonfinite_seen

    def importance_emas(self) -> list[tuple[Tensor, Tensor]]:
        """Each adapter parameter's (importance EMA, uncertainty EMA), in the order of ``params`` (every layer's
        P, λ, Q): live views into the allocator's buffers, of this process's shard under FSDP2. For inspection;
        what is written into them is the allocator's state."""
        return list(zip(self._ipt_views, self._unc_views))

    # ---------------------------------------------------------------- round
    def rank_scores(self) -> Tensor:
        """docs/ALGORITHM.md §3 scores of every slot: float32 [layers, r_max] (under FSDP2: one all-reduce)."""
        ipt = [tuple(self._ipt_views[3 * i : 3 * i + 3]) for i in range(len(self.layers))]
        unc = [tuple(self._unc_views[3 * i : 3 * i + 3]) for i in range(len(self.layers))]
        if self._shards is not None:
            return self._shards.rank_scores(ipt, unc)
        return elalora_kernels.rank_scores(ipt, unc)

    @torch.no_grad()
    def _round(self, t: int, b: int) -> tuple[RoundRecord, int]:
        """One round; also returns the non-finite count the device held (read in the same transfer)."""
        if any(p is not q for p, q in zip(self.params, (q for layer in self.layers for q in layer.slot_params()))):
            raise RuntimeError(
                "RankAllocator: the model's adapter parameters were replaced after the allocator was built "
                "(fully_shard does that): build the optimizer and the allocator after fully_shard"
            )
        table, counted = _scores_and_count_to_host(self.rank_scores(), self.score_plan.take_nonfinite())
        self._nonfinite_seen += counted
        ranks = [layer.active_rank for layer in self.layers]
        plan = plan_round(table, ranks, self.r_max, self.config.k, b)
        record = RoundRecord(step=t, budget=b)
        touched = {m: self._slot_tensors(m) for m in sorted({m for m, _ in plan.prune} | set(plan.expand))}
        with self._editable(touched, set(plan.expand)) as slots:
            for m, slot in sorted(plan.prune, key=lambda mj: -mj[1]):  # descending slots keep indices valid
                last = ranks[m] - 1
                if slot != last:
                    for tensor, dim in slots[m]:
                        _swap(tensor, dim, slot, last)
                ranks[m] = last
                record.pruned[self.names[m]] = record.pruned.get(self.names[m], 0) + 1
            with _one_thread():
                for m in plan.expand:
                    _init_slot(slots[m], ranks[m], self.generator)
                    ranks[m] += 1
                    record.expanded[self.names[m]] = record.expanded.get(self.names[m], 0) + 1
        for m, layer in enumerate(self.layers):
            if layer.active_rank != ranks[m]:
                layer.set_active_rank(ranks[m])
        record.passed_over = [self.names[m] for m in plan.passed_over]
        record.ranks = ranks
        if record.passed_over:
            logger.info("round at step %d passed over full layers %s", t, record.passed_over)
        logger.debug("round at step %d moved %d ranks: -%s +%s", t, record.moved, record.pruned, record.expanded)
        return record, counted

    def _slot_tensors(self, m: int) -> list[tuple[Tensor, int]]:
        """Every tensor holding per-slot data of layer m, with its slot dimension: the
        parameters P, λ, Q first, then their EMAs and optimizer state (this process's shards)."""
        params = self.layers[m].slot_params()
        out = [(fsdp.local(param.data), dim) for param, dim in zip(params, SLOT_DIMS)]
        for i, (param, dim) in enumerate(zip(params, SLOT_DIMS)):
            out += [(self._ipt_views[3 * m + i], dim), (self._unc_views[3 * m + i], dim)]
            out += [(fsdp.local(state), dim) for state in self._optimizer_state(param)]
        return out

    def _editable(self, touched: dict[int, list[tuple[Tensor, int]]], expanding: set[int]):
        """The round's slot tensors, edited in place; under FSDP2 whole where slots span processes."""
        if self._shards is None:
            return contextlib.nullcontext(touched)
        return self._shards.whole_slots(touched, expanding)

    def _optimizer_state(self, param: Tensor) -> list[Tensor]:
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        return [v for v in state.values() if isinstance(v, Tensor) and v.shape == param.shape]

    # ------------------------------------------------------------- queries
    def rank_pattern(self) -> dict[str, int]:
        return {name: layer.active_rank for name, layer in zip(self.names, self.layers)}

    def total_rank(self) -> int:
        return sum(layer.active_rank for layer in self.layers)

    def orth_penalty(self) -> Tensor:
        """The orthogonality regulariser with this config's coefficient, to add to the loss."""
        from .regularizer import orth_penalty

        return orth_penalty(self.layers, self.config.orth_reg)

    # ------------------------------------------------------------ resuming
    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit (the active masks live in the model).

        Under FSDP2 the EMAs are gathered into the single-process layout (a
        collective: call it on every process), so the state loads at any world size.
        """
        if self._shards is None:
            ema_ipt, ema_unc = self.ema_ipt.clone(), self.ema_unc.clone()
        else:
            offsets = _aligned_offsets(self.params)
            ema_ipt, ema_unc = self._shards.whole_emas((self._ipt_views, self._unc_views), self.params, offsets)
        return {
            "version": STATE_VERSION,
            "t": self.t,
            "config": self.config.to_dict(),
            "layers": list(self.names),
            "ema_ipt": ema_ipt,
            "ema_unc": ema_unc,
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
            "ranks": [layer.active_rank for layer in self.layers],  # checked on load: masks must match
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved from the same model and config; anything else is rejected, changing nothing."""
        self.check_state_dict(state)
        offsets = _aligned_offsets(self.params)
        if self._shards is None:
            self.ema_ipt.copy_(state["ema_ipt"])
            self.ema_unc.copy_(state["ema_unc"])
        else:
            self._shards.load_emas(state["ema_ipt"], self._ipt_views, self.params, offsets)
            self._shards.load_emas(state["ema_unc"], self._unc_views, self.params, offsets)
        self.generator.set_state(state["generator"])
        self.history = [RoundRecord(**r) for r in state["history"]]
        self.t = int(state["t"])

    def check_state_dict(self, state: dict, ranks: Optional[list[int]] = None) -> None:
        """Raise ``ValueError`` unless ``load_state_dict(state)`` would succeed.

        ``ranks`` are the active ranks the model will have when the state is
        loaded (default: the model's now), for a caller about to load both.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"RankAllocator.load_state_dict: not an allocator state of version {STATE_VERSION}")
        missing = [k for k in ("t", "config", "layers", "ema_ipt", "ema_unc", "generator", "history", "ranks") if k not in state]
        if missing:
            raise ValueError(f"RankAllocator.load_state_dict: state is missing keys {missing}")
        if state["layers"] != self.names:
            raise ValueError(
                "RankAllocator.load_state_dict: state is from a different model "
                f"({len(state['layers'])} adapted layers, this model has {len(self.names)}; "
                f"first difference: {_first_difference(state['layers'], self.names)})"
            )
        mine = self.config.to_dict()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff:
            raise ValueError(f"RankAllocator.load_state_dict: config differs (saved, current): {diff}")
        offsets = _aligned_offsets(self.params)  # the single-process layout of the EMAs
        for key in ("ema_ipt", "ema_unc"):
            src = state[key]
            if not (isinstance(src, Tensor) and src.shape == (offsets[-1],) and src.dtype == torch.float32):
                raise ValueError(f"RankAllocator.load_state_dict: {key} must be float32 of shape {(offsets[-1],)}")
        try:
            torch.Generator().set_state(state["generator"])
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"RankAllocator.load_state_dict: the generator state is invalid: {err}") from None
        if ranks is None:
            ranks = [layer.active_rank for layer in self.layers]
        if list(state["ranks"]) != list(ranks):
            raise ValueError(
                "RankAllocator.load_state_dict: the model's active ranks differ from the saved ones "
                f"(saved {list(state['ranks'])}, model {list(ranks)}); load the model's state_dict, "
                "which holds the `active` masks, before the allocator's"
            )


_MERGED = operator.attrgetter("merged")


def _warn_nonfinite(count: int, when: str) -> None:
    if count:
        warnings.warn(
            f"elalora: {count} adapter gradient elements were inf/nan {when}; their importance EMAs were left unchanged",
            RuntimeWarning,
            stacklevel=3,
        )


def _scores_and_count_to_host(scores: Tensor, count: Optional[Tensor]) -> tuple[list[list[float]], int]:
    """The round's one host sync: the score table and the device's non-finite count in one transfer
    (float64 holds both exactly)."""
    if count is None:
        return scores.tolist(), 0
    both = torch.cat([scores.reshape(-1).double(), count.double()]).tolist()
    width = scores.shape[1]
    return [both[m * width:(m + 1) * width] for m in range(scores.shape[0])], int(both[-1])


SLOT_DIMS = tuple(axis for _, axis in ElaLoRALinear.SLOTS)


def _init_slot(tensors: list[tuple[Tensor, int]], slot: int, generator: torch.Generator) -> None:
    """docs/ALGORITHM.md §4.6 on one layer's slot tensors (P, λ, Q first): a new rank orthogonal to
    the active ones, λ ≈ 0, zero EMAs and moments."""
    for tensor, dim in tensors:
        tensor.select(dim, slot).zero_()
    (P, _), (lam, _), (Q, _) = tensors[:3]
    q = _orthogonal_unit(Q[:slot], generator)
    p = _orthogonal_unit(P[:, :slot].t(), generator)
    Q[slot] = q.to(Q.dtype)
    P[:, slot] = p.to(P.dtype)
    if slot > 0:  # min(smallest |λ|, 1e-13), computed where λ is: no host sync (slot 0 stays 0)
        lam[slot] = lam[:slot].abs().min().clamp(max=1e-13)


EMA_ALIGN = 4  # elements: every view starts on a 16-byte boundary, so GPU kernels can use vector loads


def _aligned_offsets(params: list[Tensor]) -> list[int]:
    """Start of each tensor's EMA view in the flat buffer, then the buffer's size."""
    offsets = [0]
    for p in params:
        offsets.append(-(-(offsets[-1] + p.numel()) // EMA_ALIGN) * EMA_ALIGN)
    return offsets


def _views(flat: Tensor, params: list[Tensor], offsets: list[int]) -> list[Tensor]:
    return [flat[start : start + p.numel()].view(p.shape) for p, start in zip(params, offsets)]


def flat_emas(params: list[Tensor], device) -> tuple[Tensor, list[Tensor]]:
    """One flat float32 buffer of zeros for an EMA of every tensor, and the per-tensor views into it
    (each starting 16-byte aligned): the allocator's layout, which benchmarks reproduce."""
    offsets = _aligned_offsets(params)
    flat = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    return flat, _views(flat, params, offsets)


def _swap(tensor: Tensor, dim: int, i: int, j: int) -> None:
    a, b = tensor.select(dim, i), tensor.select(dim, j)
    held = a.clone()
    a.copy_(b)
    b.copy_(held)


@contextlib.contextmanager
def _one_thread():
    """New ranks need tiny float64 QRs: starting threads for them costs more than the work
    (benchmarks/RESULTS.md, "Measurements behind design choices")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orthogonal_unit(rows: Tensor, generator: torch.Generator) -> Tensor:
    """A unit vector orthogonal to every row of ``rows`` [k, d] (docs/ALGORITHM.md §4.6, exact removal).

    Drawn in float64 on the CPU from ``generator``, so the draw does not depend
    on the device. The span is removed twice against an orthonormal QR basis
    (the authors' single projection is exact only for orthonormal rows), in
    float64 where the rows are on a CUDA device (on the CPU elsewhere: MPS has
    no float64), with no host sync: a round reads the device once. When the
    rows already span the space (k ≥ d) no orthogonal direction exists and the
    random unit vector is used as drawn.
    """
    d = rows.shape[1]
    work = rows.device if rows.device.type == "cuda" else torch.device("cpu")
    v = torch.randn(d, generator=generator, dtype=torch.float64).to(work, non_blocking=True)
    if rows.shape[0] > 0:
        basis, _ = torch.linalg.qr(rows.detach().to(work, torch.float64).t())
        w = v
        for _ in range(2):
            w = w - basis @ (basis.t() @ w)
        v = torch.where(w.norm() > 1e-6 * math.sqrt(d), w, v)  # chosen on the device: no sync
    return (v / v.norm()).to(rows.device)


def _first_difference(a: list, b: list):
    for x, y in zip(a, b):
        if x != y:
            return (x, y)
    return "lengths differ"
