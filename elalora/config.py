"""ElaLoRAConfig: every hyper-parameter of the method, validated at construction."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from elalora_kernels.limits import MAX_R_MAX

from ._checks import is_int, is_number
from .architectures import TASK_TYPES

# How an adapter starts (ElaLoRAConfig.init, ElaLoRALinear(init=...)); ΔW = 0 under each.
INITS = ("paper", "zero_p")
# The schedule fields left None follow from the run's length T: (fraction of T, smallest value). The
# fractions are those the quality study ran (benchmarks/RESULTS.md); round() as Python rounds (halves to even).
SCHEDULE_FRACTIONS = {"t_init": (0.15, 0), "t_final": (0.25, 0), "mask_interval": (0.08, 1)}


def _fail(name: str, rule: str, value, where: str = "ElaLoRAConfig.") -> None:
    raise ValueError(f"{where}{name} {rule} (got {value!r})")


def resolve_r_max(r, r_max, where: str) -> int:
    """``r_max`` checked against ``r`` and the kernels' limit, ``2·r`` when None.

    The one place both are defaulted and checked: ElaLoRAConfig and ElaLoRALinear
    call it, ``where`` starting their messages.
    """
    if not is_int(r):
        _fail("r", "must be an int", r, where)
    if r < 1:
        _fail("r", "must be >= 1", r, where)
    r_max = 2 * r if r_max is None else r_max
    if not is_int(r_max):
        _fail("r_max", "must be an int", r_max, where)
    if r_max < r:
        _fail("r_max", f"must be >= r = {r}", r_max, where)
    if r_max > MAX_R_MAX:
        _fail("r_max", f"must be <= {MAX_R_MAX}, the kernels' limit", r_max, where)
    return r_max


def check_adapter_options(lora_alpha, lora_dropout, init, where: str) -> None:
    """The adapter's own options, checked in one place for ElaLoRAConfig and ElaLoRALinear (``where``
    starts the message, as in ``resolve_r_max``)."""
    if not (is_number(lora_alpha) and lora_alpha > 0):
        _fail("lora_alpha", "must be a finite number > 0", lora_alpha, where)
    if not (is_number(lora_dropout) and 0 <= lora_dropout < 1):
        _fail("lora_dropout", "must be in [0, 1)", lora_dropout, where)
    if init not in INITS:
        _fail("init", f"must be one of {INITS}", init, where)


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
    """Every hyper-parameter of ElaLoRA, validated at construction.

    The formulas are in docs/ALGORITHM.md (§ numbers below). Each field:
    [default; the value in the authors' GLUE runs, where they give one].

    The adapters (§1)
      r [8; 10, 2 for QNLI]: initial rank of every adapted matrix.
      r_max [2·r]: slots per matrix, the most rank it can grow to (at most 256,
          the kernels' limit). Shapes never change, so the memory for r_max
          slots is taken from the start.
      lora_alpha [16; 16]: sets the scale s = lora_alpha / r, fixed per layer:
          it is not rescaled when a layer's rank changes (as in the authors'
          code and AdaLoRA).
      lora_dropout [0.0]: dropout on the adapter's input only.
      init ["zero_p"; "paper"]: how each adapter starts; ΔW = 0 under both.
          "zero_p": P = 0, λ = 1, Q ~ N(0, 0.02²), as LoRA starts B = 0: every
          entry of P learns from the first step. "paper": P, Q ~ N(0, 0.02²),
          λ = 0, so at first only λ has a task gradient. The default is the
          start the quality study supports (benchmarks/RESULTS.md); "zero_p"
          wants LoRA's learning rates, "paper" tolerates larger ones.

    Which modules
      target_modules [None]: names of the layers to adapt: suffixes ("query"
          matches encoder.layer.0.attention.self.query) or one regex over the
          full name. None picks the attention and MLP projections of a known
          Hugging Face architecture (elalora.architectures.DEFAULT_TARGETS);
          "all-linear" every nn.Linear / Conv1D except the output layer.
      modules_to_save [None]: modules (suffixes or a regex, as for targets)
          trained fully instead of frozen, typically a newly initialised task
          head, and saved with the adapter. None takes the head that
          task_type adds.
      task_type [None]: "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM",
          "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION" or None. For the first three,
          modules_to_save=None means the task's head (classifier /
          pre_classifier / score; qa_outputs); the others add no head.

    Importance scores (§2, §3), updated after every optimizer step
      beta1 [0.85; 0.85]: smoothing of the sensitivity EMA Ī of |w·∂L/∂w|.
      beta2 [0.85; 0.85]: smoothing of the uncertainty EMA Ū of |ipt − Ī|.

    Rounds and their schedule (§4, §5); t counts optimizer steps from 0
      total_steps [None]: optimizer steps T of the run. May stay None when
          RankAllocator is given it (the Trainer callback passes the
          Trainer's). t_init + t_final < total_steps is required.
      t_init [round(0.15·T); 300 on RTE]: warm-up, t ≤ t_init:
          scores accumulate, ranks stay.
      t_final [round(0.25·T); 500 on RTE]: the last t_final steps: ranks
          frozen, scores no longer updated.
      mask_interval [max(1, round(0.08·T)); 50 on RTE]: steps between two
          rounds of phase 2.
          Left None, these three follow from T when the run's length is
          known (``for_run``), so the default fits any run length: the
          fractions are the schedule the quality study measured at T = 250
          (38 / 62 / 20). A value given explicitly is used as it is.
      b [4; 4]: ranks a round moves at the start of phase 2: the b weakest
          are pruned and as many new ranks added; 0 turns rounds off.
      k [2; 2]: the most ranks one matrix may lose, or gain, in one round.
      rank_scheduler [True; on]: a round at progress p through phase 2 moves
          b_t = round(b·(1 − p³)) ranks, fewer as training settles; False
          keeps b.
      seed [0]: seeds the adapters' initialisation (inject) and the
          allocator's random draws for new ranks.

    The regulariser (§6)
      orth_reg [0.1; 0.1]: coefficient c of the orthogonality penalty that
          RankAllocator.orth_penalty() returns, to add to the loss; 0 turns it
          off.
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
    t_init: Optional[int] = None
    t_final: Optional[int] = None
    mask_interval: Optional[int] = None
    total_steps: Optional[int] = None
    rank_scheduler: bool = True
    orth_reg: float = 0.1
    seed: int = 0
    init: str = "zero_p"

    def __post_init__(self) -> None:
        object.__setattr__(self, "r_max", resolve_r_max(self.r, self.r_max, "ElaLoRAConfig."))
        for name in ("target_modules", "modules_to_save"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        for name in ("b", "k", "seed"):
            if not is_int(getattr(self, name)):
                _fail(name, "must be an int", getattr(self, name))
        for name in SCHEDULE_FRACTIONS:
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                _fail(name, "must be an int or None (None: follow from total_steps)", getattr(self, name))
        check_adapter_options(self.lora_alpha, self.lora_dropout, self.init, "ElaLoRAConfig.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                _fail(name, "must be in (0, 1)", value)
        if self.b < 0:
            _fail("b", "must be >= 0", self.b)
        if self.k < 1:
            _fail("k", "must be >= 1", self.k)
        if self.t_init is not None and self.t_init < 0:
            _fail("t_init", "must be >= 0", self.t_init)
        if self.t_final is not None and self.t_final < 0:
            _fail("t_final", "must be >= 0", self.t_final)
        if self.mask_interval is not None and self.mask_interval < 1:
            _fail("mask_interval", "must be >= 1", self.mask_interval)
        if self.total_steps is not None:
            if not is_int(self.total_steps) or self.total_steps < 1:
                _fail("total_steps", "must be an int >= 1 or None", self.total_steps)
            t_init, t_final, _ = self._schedule(self.total_steps)
            if t_init + t_final >= self.total_steps:
                _fail(
                    "total_steps",
                    f"must be > t_init + t_final = {t_init} + {t_final}"
                    " (t_init + t_final must be < total_steps)",
                    self.total_steps,
                )
        if not isinstance(self.rank_scheduler, bool):
            _fail("rank_scheduler", "must be a bool", self.rank_scheduler)
        if not (is_number(self.orth_reg) and self.orth_reg >= 0):
            _fail("orth_reg", "must be a finite number >= 0", self.orth_reg)
        _check_module_names("target_modules", self.target_modules)
        _check_module_names("modules_to_save", self.modules_to_save)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            _fail("task_type", f"must be None or one of {TASK_TYPES}", self.task_type)

    def _schedule(self, total_steps: int) -> tuple[int, int, int]:
        """(t_init, t_final, mask_interval) for a run of ``total_steps``: each given value, else its fraction."""
        return tuple(
            getattr(self, name) if getattr(self, name) is not None else max(minimum, round(fraction * total_steps))
            for name, (fraction, minimum) in SCHEDULE_FRACTIONS.items()
        )

    def for_run(self, total_steps: int) -> "ElaLoRAConfig":
        """The config of a run of ``total_steps`` optimizer steps: total_steps set, and t_init, t_final and
        mask_interval filled in where they were left None (validated: raises ValueError if they do not fit)."""
        t_init, t_final, mask_interval = self._schedule(total_steps) if is_int(total_steps) else (None,) * 3
        return self.replace(total_steps=total_steps, t_init=t_init, t_final=t_final, mask_interval=mask_interval)

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
