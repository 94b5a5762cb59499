"""ElaLoRAConfig: every hyper-parameter of the method, validated at construction."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from elalora_kernels.limits import MAX_R_MAX

from ._checks import is_int, is_number
from .architectures import TASK_TYPES


def _fail(name: str, rule: str, value) -> None:
    raise ValueError(f"ElaLoRAConfig.{name} {rule} (got {value!r})")

# How an adapter starts (ElaLoRAConfig.init, ElaLoRALinear(init=...)); ΔW = 0 under each.
INITS = ("paper", "zero_p")


def _check_module_names(name: str, value) -> None:
    """``None``, one valid regex string, or a non-empty tuple of non-empty names."""
    if value is None:
        return
    if isinstance(value, str):
        if not value:
            _fail(name, "must not be empty", value)
        try:
            re.compile(value)
        except re.error as err:
            _fail(name, f"is not a valid regex ({err})", value)
    elif not (isinstance(value, tuple) and value and all(isinstance(t, str) and t for t in value)):
        _fail(name, "must be None, a regex string or a non-empty sequence of names", value)


@dataclass(frozen=True)
class ElaLoRAConfig:
    """Hyper-parameters of ElaLoRA (names as in docs/ALGORITHM.md).

    ``r`` is the initial rank of every adapted matrix and ``r_max`` its slot
    capacity (default ``2·r``). The scale ``s = lora_alpha / r`` is fixed per
    layer: it is not rescaled when a layer's rank changes (as in the authors'
    code and AdaLoRA). ``total_steps`` may be left ``None`` when the allocator
    is given it later (for instance by the Trainer callback).

    ``target_modules``: module-name suffixes (``"query"`` matches
    ``encoder.layer.0.attention.self.query``) or one regex over the full name.
    ``None`` (the default) picks the attention and MLP projections of a known
    Hugging Face architecture (``elalora.architectures.DEFAULT_TARGETS``).

    ``modules_to_save``: modules (suffixes or a regex, as for targets) that are
    trained fully instead of frozen — typically a newly initialised task head —
    and saved with the adapter. ``None`` takes the head that ``task_type`` adds.

    ``init``: how each adapter starts; ΔW = 0 under both. ``"paper"`` (the
    default, docs/ALGORITHM.md): P, Q ~ N(0, 0.02²), λ = 0, so at first only λ
    has a task gradient. ``"zero_p"``: P = 0, λ = 1, Q ~ N(0, 0.02²), as
    LoRA starts B = 0: every entry of P learns from the first step (faster
    start on short runs; see benchmarks/RESULTS.md).

    ``task_type``: one of ``"SEQ_CLS"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``,
    ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ``"FEATURE_EXTRACTION"`` or ``None``.
    For the first three, ``modules_to_save=None`` means the task's head
    (``classifier`` / ``pre_classifier`` / ``score``; ``qa_outputs``); the
    language-model and feature tasks add no head.
    """

    r: int = 8
    r_max: Optional[int] = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[str, Sequence[str], None] = None
    modules_to_save: Union[str, Sequence[str], None] = None
    task_type: Optional[str] = None
    beta1: float = 0.85
    beta2: float = 0.85
    b: int = 4
    k: int = 2
    t_init: int = 200
    t_final: int = 200
    mask_interval: int = 50
    total_steps: Optional[int] = None
    rank_scheduler: bool = True
    orth_reg: float = 0.1
    seed: int = 0
    init: str = "paper"

    def __post_init__(self) -> None:
        if self.r_max is None:
            object.__setattr__(self, "r_max", 2 * self.r if is_int(self.r) else None)
        for name in ("target_modules", "modules_to_save"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        for name in ("r", "r_max", "b", "k", "t_init", "t_final", "mask_interval", "seed"):
            if not is_int(getattr(self, name)):
                _fail(name, "must be an int", getattr(self, name))
        if self.r < 1:
            _fail("r", "must be >= 1", self.r)
        if self.r_max < self.r:
            _fail("r_max", f"must be >= r = {self.r}", self.r_max)
        if self.r_max > MAX_R_MAX:
            _fail("r_max", f"must be <= {MAX_R_MAX}, the kernels' limit", self.r_max)
        if not (is_number(self.lora_alpha) and self.lora_alpha > 0):
            _fail("lora_alpha", "must be a finite number > 0", self.lora_alpha)
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            _fail("lora_dropout", "must be in [0, 1)", self.lora_dropout)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                _fail(name, "must be in (0, 1)", value)
        if self.b < 0:
            _fail("b", "must be >= 0", self.b)
        if self.k < 1:
            _fail("k", "must be >= 1", self.k)
        if self.t_init < 0:
            _fail("t_init", "must be >= 0", self.t_init)
        if self.t_final < 0:
            _fail("t_final", "must be >= 0", self.t_final)
        if self.mask_interval < 1:
            _fail("mask_interval", "must be >= 1", self.mask_interval)
        if self.total_steps is not None:
            if not is_int(self.total_steps) or self.total_steps < 1:
                _fail("total_steps", "must be an int >= 1 or None", self.total_steps)
            if self.t_init + self.t_final >= self.total_steps:
                _fail(
                    "total_steps",
                    f"must be > t_init + t_final = {self.t_init} + {self.t_final}"
                    " (t_init + t_final must be < total_steps)",
                    self.total_steps,
                )
        if not isinstance(self.rank_scheduler, bool):
            _fail("rank_scheduler", "must be a bool", self.rank_scheduler)
        if not (is_number(self.orth_reg) and self.orth_reg >= 0):
            _fail("orth_reg", "must be a finite number >= 0", self.orth_reg)
        if self.init not in INITS:
            _fail("init", f"must be one of {INITS}", self.init)
        _check_module_names("target_modules", self.target_modules)
        _check_module_names("modules_to_save", self.modules_to_save)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            _fail("task_type", f"must be None or one of {TASK_TYPES}", self.task_type)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def replace(self, **changes) -> "ElaLoRAConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("target_modules", "modules_to_save"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ElaLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ElaLoRAConfig: unknown fields {sorted(unknown)}")
        return cls(**data)
