"""Quality study: PEFT LoRA vs PEFT AdaLoRA vs ElaLoRA at the same rank budget, on two sentiment tasks.

MiniLM-L6 with a fresh 2-way head (``harness.load_model``), adapters on query,
key, value, attention output, intermediate and output dense of every layer
(36 matrices), the head trained fully through ``modules_to_save``
(``task_type="SEQ_CLS"`` in PEFT and in ElaLoRAConfig alike). Every run trains
``SETUP["steps"]`` optimizer steps at batch 32 through ``harness.train``
(AdamW, 6% linear warm-up then linear decay, grad-clip 1.0) on a fixed
train / validation / test split, with the same batches for the same seed,
each method on its authors' objective:

* ``lora`` (PEFT):    rank r, alpha 2r, the plain task loss (checked at the start of every run).
* ``adalora`` (PEFT): init_r ⌈1.5r⌉ → target_r r, alpha 2r, PEFT's orth_reg_weight 0.5, ElaLoRA's
                      t_init / t_final / interval. Wrapped with ``task_type="SEQ_CLS"`` so that
                      ``AdaLoraModel.forward`` adds its orthogonality penalty to the loss (checked, and
                      recorded, at the start of every run); ``update_and_allocate(t)`` after each
                      ``optimizer.step()``, before ``zero_grad``.
* ``elalora-<init>``: r_init r, r_max 2r, alpha 2r, b 4, k 2, loss + ``allocator.orth_penalty()``, and the
                      library's default schedule for the run's length (t_init, t_final, mask_interval not given).
* ``elalora-<init>-fixed``: the same adapter, start and penalty with reallocation off (b = 0): what the
                      rank movement itself buys.

The grid: r ∈ {2, 8}; the lr of each (task, r, method) is picked from
``LRS`` on the validation split with seed 0, then seeds 1 and 2 run at that
lr; in the headline cells (r = 2, both tasks) seeds 3 to 9 follow, for the default, PEFT LoRA and the default with
reallocation off at the default's lr. ``--long`` runs the 750-step cell instead, ``--base nf4`` the cell on a
4-bit base. Where no lr of ``LRS`` leaves the
majority class on validation,
``FALLBACK_LRS`` are tried in turn (seed 0), so that a method is compared at
an lr where it learns. A run whose validation accuracy ends within 2 points of the majority class is
marked "did not learn" and never averaged silently. Each run appends one JSON
line to ``--jsonl``; runs there are skipped, so the study resumes where it
stopped, and several workers share the grid through claim files.

    nice python benchmarks/quality.py & nice python benchmarks/quality.py; wait   # the grid, 2 workers
    python benchmarks/quality.py --write-md            # tables from the JSONL into RESULTS.md
    python benchmarks/quality.py --status              # how far the grid got
    nice python benchmarks/quality.py --long           # the 750-step cell (its own lr selection, then 3 seeds)
    nice python benchmarks/quality.py --base nf4       # the 4-bit-base cell (QLoRA), movies r = 8
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training

from elalora import ElaLoRAConfig, RankAllocator, inject
from elalora.viz import plot_rank_heatmap, rank_grid, split_name

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

RESULTS = harness.ROOT / "benchmarks" / "RESULTS.md"
JSONL = harness.ROOT / "benchmarks" / "quality_runs.jsonl"
HEATMAP = harness.ROOT / "benchmarks" / "quality_long_ranks.png"  # the long cell's rank map, from --write-md
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
# (validation, test) examples per task; the rest trains. movies: 10,568 labelled, tweets: 4,196.
SPLITS = {"movies": (1000, 2000), "tweets": (600, 1000)}
SETUP = dict(steps=250, batch_size=32, eval_at=(50, 100, 125, 150, 200, 250), splits=SPLITS)
SHORT = 125  # the short-run point reported beside the final accuracy
LRS = (2e-3, 5e-3)
# Tried at seed 0, one after another, only while no lr so far left the majority class on validation: a
# method that collapses at both LRS (PEFT LoRA on tweets at r = 8 did) is still compared where it learns.
FALLBACK_LRS = (1e-3, 5e-4)
RANKS = (8, 2)
SEEDS = (0, 1, 2)
BLOCKS = [(task, r) for task in ("movies", "tweets") for r in RANKS]  # the order the grid runs in
ELALORA = {  # method -> ElaLoRAConfig overrides
    "elalora-paper": dict(init="paper"),
    "elalora-paper-fixed": dict(init="paper", b=0),
    "elalora-zero_p": dict(init="zero_p"),
    "elalora-zero_p-fixed": dict(init="zero_p", b=0),
}
METHODS = ("lora", "adalora", *ELALORA)
NAMES = {"lora": "LoRA (peft)", "adalora": "AdaLoRA (peft)", "elalora-paper": 'ElaLoRA, init="paper"',
         "elalora-paper-fixed": 'ElaLoRA, init="paper", reallocation off',
         "elalora-zero_p": 'ElaLoRA, init="zero_p"', "elalora-zero_p-fixed": 'ElaLoRA, init="zero_p", reallocation off'}
DID_NOT_LEARN = 0.02  # a run ending within this of the majority-class accuracy
DEFAULT = "elalora-zero_p"  # ElaLoRAConfig's defaults
# The headline pairs at r = 2, 10 seeds each: the default against PEFT LoRA, and against itself with
# reallocation off at the default's lr (so that only the rank movement differs between the arms).
HEADLINE_CELLS = (("movies", 2), ("tweets", 2))
HEADLINE_PAIRS = ((DEFAULT, "lora"), (DEFAULT, f"{DEFAULT}-fixed"))
HEADLINE_METHODS = tuple(dict.fromkeys(m for pair in HEADLINE_PAIRS for m in pair))
HEADLINE_SEEDS = tuple(range(10))
# The longer cell: 750 steps (~2.7 passes over movies' training split), the headline methods, 3 seeds. Its lrs
# are picked on its own validation runs (seed 0), as in the grid: at 750 steps the 250-step picks need not learn.
LONG = dict(SETUP, steps=750, eval_at=(50, 125, 250, 375, 500, 625, 750))
LONG_CELL = ("movies", 2)
# On a 4-bit base (QLoRA): the default against PEFT LoRA on the same NF4 base, 3 seeds, each lr picked on
# validation at seed 0 as in the grid. Its rows carry base="nf4" in their setup and are kept apart.
QUANT = dict(SETUP, base="nf4")
QUANT_CELL = ("movies", 8)
QUANT_METHODS = (DEFAULT, "lora")


# ------------------------------------------------------------------ one run
@dataclass
class Run:
    model: torch.nn.Module
    hooks: harness.Hooks = field(default_factory=harness.Hooks)
    allocator: Optional[RankAllocator] = None


def build(method: str, r: int, seed: int, steps: int, base: Optional[str] = None) -> Run:
    """Load the model with a fresh head (drawn from ``seed``), on a float32 or 4-bit ``base``, and wrap it for
    ``method``."""
    model = harness.load_model(seed, base)
    schedule = ElaLoRAConfig(r=r).for_run(steps)  # the library's default schedule for a run of this length
    if method == "lora":
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGETS))
        if base is not None:  # QLoRA as PEFT documents it (its defaults: gradient checkpointing on)
            model = prepare_model_for_kbit_training(model)
        run = Run(get_peft_model(model, cfg))
    elif method == "adalora":
        cfg = AdaLoraConfig(task_type="SEQ_CLS", init_r=math.ceil(1.5 * r), target_r=r, lora_alpha=2 * r,
                            lora_dropout=0.0, target_modules=list(TARGETS), tinit=schedule.t_init,
                            tfinal=schedule.t_final, deltaT=schedule.mask_interval, beta1=0.85, beta2=0.85,
                            total_step=steps)
        run = Run(get_peft_model(model, cfg))
        run.hooks.after_step = run.model.base_model.update_and_allocate  # as PEFT documents
    elif method in ELALORA:
        fields = dict(r=r, r_max=2 * r, lora_alpha=2.0 * r, target_modules=TARGETS, task_type="SEQ_CLS", b=4, k=2,
                      total_steps=steps, seed=seed)  # t_init, t_final, mask_interval: the defaults
        cfg = ElaLoRAConfig(**{**fields, **ELALORA[method]})
        inject(model, cfg)  # the classifier is in modules_to_save and trains fully
        run = Run(model)

        def on_optimizer(optimizer):
            run.allocator = RankAllocator(model, cfg, optimizer=optimizer)

        run.hooks.after_step = lambda t: run.allocator.step()
        run.hooks.extra_loss = lambda: run.allocator.orth_penalty()
        run.hooks.on_optimizer = on_optimizer
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return run


def loss_beyond_task_loss(model: torch.nn.Module, batch: dict) -> float:
    """What the model's own loss adds to the cross-entropy: PEFT AdaLoRA's penalty, 0 for LoRA."""
    out = model(**batch)
    return float(out.loss - torch.nn.functional.cross_entropy(out.logits, batch["labels"]))


def run_one(spec: dict, data: dict, setup: dict) -> dict:
    task, method, r, lr, seed = (spec[k] for k in ("task", "method", "r", "lr", "seed"))
    torch.manual_seed(seed)
    run = build(method, r, seed, setup["steps"], setup.get("base"))
    row = dict(spec)
    if setup.get("base"):
        row["adapted_layer_types"] = adapted_layer_types(run.model)
    if method in ("lora", "adalora"):
        first = data["train"].batch(torch.arange(min(32, len(data["train"]))))
        with torch.no_grad():
            row["loss_beyond_ce"] = loss_beyond_task_loss(run.model, first)
        if (method == "adalora") != (row["loss_beyond_ce"] > 1e-6):
            raise RuntimeError(f"{method}: the loss is not its authors' objective ({row['loss_beyond_ce']=})")
    result = harness.train(run.model, data["train"], steps=setup["steps"], batch_size=setup["batch_size"], lr=lr,
                           seed=seed, hooks=run.hooks, val=data["val"], eval_at=setup["eval_at"])
    test = data["test"]
    test_correct = harness.correct(run.model, test)
    row.update(
        val_curve={str(t): acc for t, acc in result.curve.items()}, val_final=result.curve[setup["steps"]],
        test_accuracy=test_correct.sum().item() / len(test), test_majority=test.majority_accuracy(),
        test_correct="".join("1" if c else "0" for c in test_correct.tolist()),  # per example, for paired analyses
        loss_curve=[round(statistics.mean(chunk), 4) for chunk in split_evenly(result.losses, 10)],
        trainable_params=sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        adapter_params=adapter_params(method, run.model),
        optimizer_state_bytes=result.optimizer_state_bytes,
        train_cpu_seconds=round(result.cpu_seconds, 1), train_wall_seconds=round(result.wall_seconds, 1),
        threads=torch.get_num_threads(), setup=setup)
    row["learned"] = learned_on_val(row)  # rows before this field was judged on validation: tables recompute it
    if run.allocator is not None:
        row.update(capacity_record(run.allocator, r))
    return row


def adapted_layer_types(model: torch.nn.Module) -> list[str]:
    """The classes of the adapted layers (PEFT's bitsandbytes LoRA layers on a 4-bit base), checked to sit on
    bitsandbytes ``Linear4bit`` bases: a method that silently fell back to a float base would not be QLoRA."""
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") or hasattr(m, "active_rank")]
    names = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in adapted})
    if not adapted or any(type(getattr(m, "base_layer", None)).__name__ != "Linear4bit" for m in adapted):
        raise RuntimeError(f"not every adapted layer sits on a 4-bit base: {names}")
    return names


def split_evenly(values: list, parts: int) -> list[list]:
    """``values`` cut into ``parts`` consecutive chunks of (nearly) equal length, none empty."""
    parts = min(parts, len(values))
    bounds = [round(i * len(values) / parts) for i in range(parts + 1)]
    return [values[a:b] for a, b in zip(bounds, bounds[1:])]


def adapter_params(method: str, model: torch.nn.Module) -> int:
    """Parameters of the final adapter at its active ranks (the classification head excluded)."""
    total = 0
    for module in model.modules():
        if method == "lora" and "default" in getattr(module, "lora_A", {}):
            total += module.lora_A["default"].weight.numel() + module.lora_B["default"].weight.numel()
        elif method == "adalora" and "default" in getattr(module, "lora_E", {}):
            rank = int((module.lora_E["default"].detach() != 0).sum())  # the final mask zeroes pruned ranks
            total += rank * (module.lora_A["default"].shape[1] + module.lora_B["default"].shape[0] + 1)
        elif method in ELALORA and hasattr(module, "active_rank"):
            total += module.active_rank * (module.in_features + module.out_features + 1)
    return total


def capacity_record(allocator, r: int) -> dict:
    """Each layer's highest rank over the run, and the layers a full r_max turned away."""
    peak = [r] * len(allocator.names)
    for rec in allocator.history:
        peak = [max(a, b) for a, b in zip(peak, rec.ranks)]
    passed_over = sorted({name for rec in allocator.history for name in rec.passed_over})
    return dict(r_max=allocator.config.r_max, rounds=len(allocator.history),
                ranks_moved=sum(rec.moved for rec in allocator.history), peak_ranks=peak,
                passed_over=passed_over, final_ranks=list(allocator.rank_pattern().values()),
                layers=list(allocator.names),
                rank_history=[dict(step=rec.step, pruned=rec.pruned, expanded=rec.expanded, ranks=rec.ranks)
                              for rec in allocator.history])


# ------------------------------------------------------------------ the grid
def cell(row: dict) -> tuple:
    return row["task"], row["r"], row["method"]


def run_key(row: dict) -> tuple:
    return row["task"], row["r"], row["method"], row["lr"], row["seed"]


@functools.lru_cache(maxsize=None)
def val_majority(task: str, n_val: int, n_test: int) -> float:
    """The validation split's majority-class accuracy (labels only: no tokenizer)."""
    parts = harness.split(harness.load_sentiment(harness.TASKS[task]), n_val, n_test)
    return harness.majority_accuracy([y for _, y in parts.val])


def learned_on_val(row: dict) -> bool:
    """The run ended more than DID_NOT_LEARN above the majority class on validation (the test split never
    decides anything)."""
    return row["val_final"] > val_majority(row["task"], *row["setup"]["splits"][row["task"]]) + DID_NOT_LEARN


def seed0_runs(rows: list[dict], task: str, r: int, method: str) -> dict[float, dict]:
    return {row["lr"]: row for row in rows if cell(row) == (task, r, method) and row["seed"] == 0}


def lrs_to_try(rows: list[dict], task: str, r: int, method: str) -> list[float]:
    """LRS, then each FALLBACK_LRS in turn while every lr so far ran at seed 0 and none learned on validation."""
    seed0, lrs = seed0_runs(rows, task, r, method), list(LRS)
    for fallback in FALLBACK_LRS:
        if not all(lr in seed0 for lr in lrs) or any(learned_on_val(seed0[lr]) for lr in lrs):
            break
        lrs.append(fallback)
    return lrs


def picked_lr(rows: list[dict], task: str, r: int, method: str) -> Optional[float]:
    """Among the lrs tried, those that learned on validation (all, if none did), the one with the best final
    validation accuracy at seed 0 (the lower lr on a tie); None until the runs it needs are done."""
    seed0, lrs = seed0_runs(rows, task, r, method), lrs_to_try(rows, task, r, method)
    if not all(lr in seed0 for lr in lrs):
        return None
    learned = [lr for lr in lrs if learned_on_val(seed0[lr])] or lrs
    return max(sorted(learned), key=lambda lr: seed0[lr]["val_final"])


def headline_lr(rows: list[dict], task: str, r: int, method: str) -> Optional[float]:
    """A headline run's lr: the method's own validation pick; reallocation off runs at the default's."""
    return picked_lr(rows, task, r, DEFAULT if method == f"{DEFAULT}-fixed" else method)


def headline_specs(lr_rows: list[dict], task: str, r: int, seeds, methods=HEADLINE_METHODS) -> list[dict]:
    """The headline methods' runs at their headline lrs (from ``lr_rows``), once those lrs are known."""
    lrs = {m: headline_lr(lr_rows, task, r, m) for m in methods if m in HEADLINE_METHODS}
    return [dict(task=task, r=r, method=m, lr=lr, seed=s) for s in seeds for m, lr in lrs.items() if lr is not None]


def plan(rows: list[dict], tasks=None, methods=METHODS, blocks=BLOCKS, headline_seeds=HEADLINE_SEEDS) -> list[dict]:
    """Every run still to do that can start now, block by block: the lr selection (seed 0 at each lr),
    then the other seeds of each method whose lr is picked; then the headline cells' ``headline_seeds``."""
    done = {run_key(row) for row in rows}
    todo = []
    for task, r in blocks:
        if tasks and task not in tasks:
            continue
        specs = [dict(task=task, r=r, method=m, lr=lr, seed=0) for m in methods
                 for lr in lrs_to_try(rows, task, r, m)]
        for method in methods:
            lr = picked_lr(rows, task, r, method)
            if lr is not None:
                specs += [dict(task=task, r=r, method=method, lr=lr, seed=s) for s in SEEDS[1:]]
        if (task, r) in HEADLINE_CELLS:
            specs += headline_specs(rows, task, r, headline_seeds, methods)
        todo += [spec for spec in specs if run_key(spec) not in done]
    # the headline seeds seed by seed across tasks, so that a stopped study leaves complete pairs in every cell
    todo.sort(key=lambda spec: spec["seed"] if spec["seed"] > SEEDS[-1] else -1)
    return list({run_key(spec): spec for spec in todo}.values())


def plan_long(rows: list[dict]) -> list[dict]:
    """The longer cell's runs still to do: the lr selection of the default and of PEFT LoRA (seed 0, on
    validation), then seeds 0–2 of the three headline arms (reallocation off at the default's lr)."""
    picks = plan(rows, None, (DEFAULT, "lora"), [LONG_CELL], headline_seeds=())  # lr selection, seeds 1 and 2
    arms = headline_specs(rows, *LONG_CELL, SEEDS)  # once picked: all three arms, seeds 0–2
    done = {run_key(row) for row in rows}
    return list({run_key(spec): spec for spec in picks + arms if run_key(spec) not in done}.values())


def claim_path(claims: Path, spec: dict) -> Path:
    return claims / ("_".join(str(v) for v in run_key(spec)) + ".claim")


def claim(claims: Path, spec: dict) -> bool:
    """Take a run for this worker: a claim file made with O_EXCL; a claim whose process is gone is taken over."""
    path = claim_path(claims, spec)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return False  # another live worker has it
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)  # left by a worker that died
                continue
            except FileNotFoundError:
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def read_rows(path: Path, setup: dict = SETUP) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row.get("setup") == json.loads(json.dumps(setup))]


def work(jsonl: Path, setup: dict, tasks=None, methods=METHODS, limit: Optional[int] = None, planner=None) -> int:
    """Run planned runs until none is left (or ``limit`` ran); returns how many this worker ran.
    ``planner(rows)`` lists the runs still to do (default: the grid's ``plan``)."""
    planner = planner or (lambda rows: plan(rows, tasks, methods))
    # one claims folder per setup: a 750-step run, a 4-bit run and a grid run of the same key are different runs
    kind = "-".join([f"{setup['steps']}"] * (setup["steps"] != SETUP["steps"]) + [setup.get("base")] * ("base" in setup))
    claims = jsonl.with_suffix(f".{kind}-claims" if kind else ".claims")
    claims.mkdir(parents=True, exist_ok=True)
    data: dict = {}
    ran = 0
    while limit is None or ran < limit:
        spec = next((s for s in planner(read_rows(jsonl, setup)) if claim(claims, s)), None)
        if spec is None:
            return ran
        try:
            if spec["task"] not in data:
                data[spec["task"]] = harness.load_task(spec["task"], *setup["splits"][spec["task"]])
            row = run_one(spec, data[spec["task"]], setup)
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        finally:
            claim_path(claims, spec).unlink(missing_ok=True)
        ran += 1
        print(f"{spec['task']:6s} r={spec['r']} {spec['method']:22s} lr={spec['lr']:g} seed={spec['seed']}: "
              f"val {row['val_final']:.4f} test {row['test_accuracy']:.4f} "
              f"cpu {row['train_cpu_seconds']:.0f} s", flush=True)
    return ran


# ------------------------------------------------------------------ the tables
def mean_std(values: list[float], digits: int = 3, sign: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{statistics.mean(values):{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def final_runs(rows: list[dict], task: str, r: int, method: str) -> list[dict]:
    """The runs at the picked lr, by seed."""
    lr = picked_lr(rows, task, r, method)
    return sorted((row for row in rows if cell(row) == (task, r, method) and row["lr"] == lr),
                  key=lambda row: row["seed"])


def paired(rows: list[dict], task: str, r: int, method: str, against: str, point: Optional[str] = None) -> list[float]:
    """``method`` − ``against`` per seed (same seed: same head, same batches), each at the lr it picked; test
    accuracy, or validation accuracy at step ``point``. A seed where either did not learn is left out."""
    def value(row):
        return row["test_accuracy"] if point is None else row["val_curve"][point]

    base = {row["seed"]: value(row) for row in final_runs(rows, task, r, against) if learned_on_val(row)}
    return [value(row) - base[row["seed"]] for row in final_runs(rows, task, r, method)
            if learned_on_val(row) and row["seed"] in base]


def points(diffs: list[float]) -> str:
    """Differences of accuracy in points: mean ± std, and in how many seeds the first method is ahead."""
    return f"{mean_std([d * 100 for d in diffs], 1, '+')} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def markdown(rows: list[dict], setup: dict = SETUP, long_rows: tuple = (), quant_rows: tuple = ()) -> str:
    steps = setup["steps"]
    short = str(min(setup["eval_at"], key=lambda t: abs(t - SHORT)))
    lines = [
        "## Quality: LoRA vs AdaLoRA vs ElaLoRA on two sentiment tasks (MiniLM-L6)",
        "",
        f"Generated by `python benchmarks/quality.py --write-md` from `benchmarks/quality_runs.jsonl` "
        f"({len(rows)} runs: {len(BLOCKS) * len(METHODS) * (len(LRS) + len(SEEDS) - 1)} make the grid, plus a "
        f"seed-0 run at each fallback lr a method needed). "
        f"Each run: {steps} optimizer steps at batch {setup['batch_size']}, one CPU thread; validation accuracy "
        f"at steps {', '.join(map(str, setup['eval_at']))}; test accuracy at the end. Splits (fixed, shuffle seed "
        f"{harness.SPLIT_SEED}): " + "; ".join(f"{t} {v:,} validation / {n:,} test, the rest training"
                                               for t, (v, n) in setup["splits"].items()) + ". "
        "lr picked per task, r and method on the validation split with seed 0; seeds 1 and 2 then run at that lr "
        f"(seeds 1 to {HEADLINE_SEEDS[-1]} in the headline cells). "
        f"Where neither {' nor '.join(f'{lr:g}' for lr in LRS)} left the majority class on validation, "
        f"{', then '.join(f'{lr:g}' for lr in FALLBACK_LRS)} were tried (seed 0). "
        "Δ vs LoRA is the paired per-seed difference of test accuracy (same seeds, same batches): mean ± std, and in "
        "how many seeds the method is ahead. A run is marked *did not learn* when its final validation accuracy ends "
        f"within {DID_NOT_LEARN * 100:.0f} points of the validation majority class.",
        "",
        "Which split made each choice. The test split gives each run's final score and decides nothing:",
        "",
        "* **lr** of every (task, r, method): validation, seed 0 (above).",
        "* **the default start `init=\"zero_p\"`**: validation. Against `init=\"paper\"`, each at its own lr, "
        "the paired final validation accuracy is in the row *zero_p − paper, val @ "
        f"{steps}* below, and the early validation accuracy in the *val @ {min(setup['eval_at'])}* row. (The choice "
        "was first argued from test accuracy; the validation rows are what it rests on now.)",
        "* **`r_max = 2r`**: the ranks layers reached during training (capacity table below); no split.",
        "* **the schedule's fractions** (warm-up 15%, stabilisation 25%, a round every 8% of the steps, the library's "
        "defaults): fixed before the study, tuned on no split.",
        "* **did not learn**: validation.",
    ]
    for task in dict.fromkeys(t for t, _ in BLOCKS):
        sel = [row for row in rows if row["task"] == task]
        if not sel:
            continue
        lines += ["", f"### {task}", "",
                  f"| r | method | lr (val, seed 0: {' / '.join(f'{lr:g}' for lr in LRS + FALLBACK_LRS)}) | seeds | "
                  f"val @ {short} | val @ {steps} | test | Δ test vs LoRA, points (seeds ahead) | did not learn |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in RANKS:
            for method in METHODS:
                seed0 = seed0_runs(rows, task, r, method)
                if not seed0:
                    continue
                shown = LRS + tuple(lr for lr in FALLBACK_LRS if lr in seed0)
                lr_cell = " / ".join(f"{seed0[lr]['val_final']:.3f}" if lr in seed0 else "–" for lr in shown)
                runs = final_runs(rows, task, r, method)
                if not runs:
                    lines.append(f"| {r} | {NAMES[method]} | {lr_cell} | 0 | | | | | |")
                    continue
                pick = runs[0]["lr"]
                learned = [row for row in runs if learned_on_val(row)]
                diffs = paired(rows, task, r, method, "lora")
                delta = "" if method == "lora" or not diffs else points(diffs)
                failed = [f"s{row['seed']}" for row in runs if not learned_on_val(row)]
                lines.append(
                    f"| {r} | {NAMES[method]} | **{pick:g}** ({lr_cell}) | {len(runs)} | "
                    f"{mean_std([row['val_curve'][short] for row in learned]) if learned else '–'} | "
                    f"{mean_std([row['val_final'] for row in learned]) if learned else '–'} | "
                    f"{mean_std([row['test_accuracy'] for row in learned]) if learned else '–'} | {delta} | "
                    f"{', '.join(failed) or 'none'} |")
    lines += headline(rows) + comparisons(rows, str(min(setup["eval_at"])), short, str(steps))
    lines += long_cell(list(long_rows)) + quantized(list(quant_rows))
    lines += objectives(rows) + curves(rows, setup) + costs(rows) + capacity(rows)
    return "\n".join(lines)


COMPARISONS = (  # (method, against, None for test, or "first" / "short" / "final": validation at that step)
    ("elalora-zero_p", "elalora-paper", None), ("elalora-zero_p", "elalora-paper", "final"),
    ("elalora-zero_p", "elalora-paper", "first"),
    ("elalora-zero_p", "elalora-paper", "short"),
    ("elalora-paper", "elalora-paper-fixed", None), ("elalora-zero_p", "elalora-zero_p-fixed", None),
    ("elalora-paper", "lora", None), ("elalora-zero_p", "lora", None), ("adalora", "lora", None),
)


def comparisons(rows: list[dict], first: str, short: str, final: str) -> list[str]:
    """Paired differences per cell and pooled over every seed of every cell: which start, what reallocation buys."""
    lines = ["", "### Paired differences (points of accuracy: mean ± std over seeds, seeds ahead)", "",
             "| difference | " + " | ".join(f"{task} r = {r}" for task, r in BLOCKS) + " | all cells |",
             "|---|" + "---|" * (len(BLOCKS) + 1)]
    for method, against, point in COMPARISONS:
        point = {"first": first, "short": short, "final": final}.get(point, point)
        per_cell = [paired(rows, task, r, method, against, point) for task, r in BLOCKS]
        if not any(per_cell):
            continue
        pooled = [d for diffs in per_cell for d in diffs]
        what = "test" if point is None else f"val @ {point}"
        lines.append(f"| {NAMES[method]} − {NAMES[against]}, {what} | "
                     + " | ".join(points(d) if d else "–" for d in per_cell) + f" | {points(pooled)} |")
    return lines


def objectives(rows: list[dict]) -> list[str]:
    """What each PEFT baseline's loss added to the cross-entropy on its first batch, as run_one checked it."""
    lines = ["", "### Objectives, checked at the start of every run", ""]
    for method, what in (("lora", "the plain cross-entropy"), ("adalora", "the cross-entropy plus PEFT's "
                                                                        "orthogonality penalty (weight 0.5)")):
        extra = [row["loss_beyond_ce"] for row in rows if row["method"] == method]
        if extra:
            lines.append(f"* {NAMES[method]}, {len(extra)} runs: loss − cross-entropy = {min(extra):.6f} … "
                         f"{max(extra):.6f} on the first 32 training sentences: {what}.")
    return lines


def curves(rows: list[dict], setup: dict) -> list[str]:
    points = [str(t) for t in setup["eval_at"]]
    lines = ["", "### Learning curves: validation accuracy (mean over the seeds at the picked lr)", "",
             "| task | r | method | " + " | ".join(f"step {p}" for p in points) + " |",
             "|---|---|---|" + "---|" * len(points)]
    for task, r in BLOCKS:
        for method in METHODS:
            runs = final_runs(rows, task, r, method)
            if runs:
                lines.append(f"| {task} | {r} | {NAMES[method]} | " + " | ".join(
                    f"{statistics.mean(row['val_curve'][p] for row in runs):.3f}" for p in points) + " |")
    return lines


def costs(rows: list[dict]) -> list[str]:
    lines = ["", "### Cost per run (mean over the runs there are)", "",
             "| r | method | final adapter params | trainable params (head included) | optimizer state | "
             "train CPU s / run |", "|---|---|---|---|---|---|"]
    for r in RANKS:
        for method in METHODS:
            sel = [row for row in rows if (row["method"], row["r"]) == (method, r)]
            if sel:
                lines.append(
                    f"| {r} | {NAMES[method]} | {statistics.mean(x['adapter_params'] for x in sel):,.0f} | "
                    f"{sel[0]['trainable_params']:,} | {sel[0]['optimizer_state_bytes'] / 2**20:.2f} MiB | "
                    f"{statistics.mean(x['train_cpu_seconds'] for x in sel):.0f} |")
    return lines


def capacity(rows: list[dict]) -> list[str]:
    """How many (run, layer) pairs a cap would have turned away: a peak above a cap below the run's r_max,
    or a pass-over at the run's own r_max. A cap that no layer's peak exceeds never binds: the allocator
    would have taken the same decisions (up to rounding)."""
    body = []
    for r in RANKS:
        sel = [row for row in rows if row["r"] == r and row["method"] in ELALORA and ELALORA[row["method"]].get("b") != 0]
        if not sel:
            continue
        pairs = sum(len(row["peak_ranks"]) for row in sel)
        cells = []
        for cap in (math.ceil(1.25 * r), math.ceil(1.5 * r), 2 * r):
            capped = sum(len(row["passed_over"]) if cap == row["r_max"] else sum(p > cap for p in row["peak_ranks"])
                         for row in sel)
            cells.append(f"{capped} (cap {cap})")
        body.append(f"| {r} | {len(sel)} runs | {pairs} | {max(max(row['peak_ranks']) for row in sel)} | "
                    + " | ".join(cells) + " |")
    if not body:
        return []
    return ["", "### Capacity: layers an r_max would have capped (ElaLoRA runs with reallocation on)", "",
            "| r | runs | layers × runs | highest rank reached | capped at ⌈1.25 r⌉ | capped at ⌈1.5 r⌉ | "
            "capped at 2r |", "|---|---|---|---|---|---|---|", *body]


# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """The 95% t-interval of the mean of paired differences (seeds independent; needs 2 to 21 of them)."""
    mean = statistics.mean(diffs)
    half = T975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean - half, mean + half


def headline_failures(rows: list[dict], task: str, r: int, methods) -> str:
    """The seeds at which a headline arm did not learn (on validation), e.g. 'LoRA (peft) s5'."""
    out = [f"{NAMES[m]} s{row['seed']}" for m in methods for row in rows if cell(row) == (task, r, m)
           and row["lr"] == headline_lr(rows, task, r, m) and not learned_on_val(row)]
    return ", ".join(out) or "none"


def headline_pairs(rows: list[dict], task: str, r: int, method: str, against: str) -> list[float]:
    """``method`` − ``against``, test accuracy, per seed at the headline lrs; seeds where either did not learn (on
    validation) are left out."""
    def runs(m):
        lr = headline_lr(rows, task, r, m)
        return {row["seed"]: row for row in rows if cell(row) == (task, r, m) and row["lr"] == lr and learned_on_val(row)}

    mine, theirs = runs(method), runs(against)
    return [mine[s]["test_accuracy"] - theirs[s]["test_accuracy"] for s in sorted(mine) if s in theirs]


def interval_cells(diffs: list[float]) -> str:
    """'mean | [low, high] | ahead/n' in points of accuracy."""
    if len(diffs) < 2:
        return f"{diffs[0] * 100:+.2f} | – | {sum(d > 0 for d in diffs)}/{len(diffs)}" if diffs else "– | – | –"
    low, high = t_interval(diffs)
    return (f"{statistics.mean(diffs) * 100:+.2f} | [{low * 100:+.2f}, {high * 100:+.2f}] | "
            f"{sum(d > 0 for d in diffs)}/{len(diffs)}")


def headline(rows: list[dict]) -> list[str]:
    """The headline pairs at r = 2 with 95% intervals: what the data can and cannot tell apart."""
    lines = ["", f"### Headline: paired differences with 95% intervals (r = 2, up to {len(HEADLINE_SEEDS)} seeds)", "",
             "Test accuracy, method − comparator, in points, per seed (same seed: same head init, same batches; "
             "the adapters have no dropout; MiniLM's own dropout, 0.1 as its config sets it, draws its masks from the "
             "global generator seeded with the run's seed, so each run repeats exactly, though the two arms' masks "
             "are not the same draws). Interval: Student's t over seeds "
             "(mean ± t₀.₉₇₅ · sd / √n). Every arm runs at the lr its method picked on validation; reallocation off "
             "runs at the default's lr, so that only the rank movement differs.", "",
             "A seed where either arm did not learn (it ended at the majority class on validation) is left out of the "
             "pair and named in the last column.", "",
             "| difference | task | lrs | mean | 95% interval | seeds ahead | did not learn |",
             "|---|---|---|---|---|---|---|"]
    for method, against in HEADLINE_PAIRS:
        pooled = []
        for task, r in HEADLINE_CELLS:
            diffs = headline_pairs(rows, task, r, method, against)
            pooled += diffs
            lrs = " / ".join(f"{headline_lr(rows, task, r, m) or float('nan'):g}" for m in (method, against))
            lines.append(f"| {NAMES[method]} − {NAMES[against]} | {task} | {lrs} | {interval_cells(diffs)} | "
                         f"{headline_failures(rows, task, r, (method, against))} |")
        lines.append(f"| {NAMES[method]} − {NAMES[against]} | both (pooled seeds) | | {interval_cells(pooled)} | |")
    return lines


def long_cell(rows: list[dict], heatmap: Path = HEATMAP) -> list[str]:
    """The 750-step cell: lr selection, accuracy, paired differences, the ranks moved, one seed's rank map."""
    if not rows:
        return []
    task, r = LONG_CELL
    steps = str(LONG["steps"])
    lines = ["", f"### A longer run: {task}, r = {r}, {steps} steps (about 2.7 passes over the training split)", "",
             "The lrs are picked in this cell, on validation at seed 0, by the grid's rule (the 250-step picks need "
             "not learn over a longer schedule); seeds 0–2 then run at the picks, reallocation off at the default's. "
             "Validation accuracy over the run (mean over the seeds at the pick), test accuracy at the end. "
             "Runs: `nice python benchmarks/quality.py --long` (one or more workers).", "",
             "| method | lr (val @ " + steps + ", seed 0) | seeds | " + " | ".join(f"val @ {t}" for t in LONG["eval_at"])
             + " | test | ranks moved / run | did not learn |", "|---|---|---|" + "---|" * (len(LONG["eval_at"]) + 3)]
    for method in HEADLINE_METHODS:
        lr = headline_lr(rows, task, r, method)
        runs = sorted((row for row in rows if cell(row) == (task, r, method) and row["lr"] == lr),
                      key=lambda row: row["seed"])
        seed0 = seed0_runs(rows, task, r, method)
        tried = " / ".join(f"{x:g}: {seed0[x]['val_final']:.3f}" for x in sorted(seed0, reverse=True))
        if not runs:
            lines.append(f"| {NAMES[method]} | – ({tried}) | 0 |" + " |" * (len(LONG["eval_at"]) + 3))
            continue
        learned = [row for row in runs if learned_on_val(row)] or runs
        moved = statistics.mean(row.get("ranks_moved", 0) for row in runs)
        failed = ", ".join(f"s{row['seed']}" for row in runs if not learned_on_val(row)) or "none"
        lines.append(f"| {NAMES[method]} | **{lr:g}** ({tried}) | {len(runs)} | " + " | ".join(
            f"{statistics.mean(row['val_curve'][str(t)] for row in learned):.3f}" for t in LONG["eval_at"])
            + f" | {mean_std([row['test_accuracy'] for row in learned])} | {moved:.0f} | {failed} |")
    lines += ["", "| difference (test, points) | mean | 95% interval | seeds ahead |", "|---|---|---|---|"]
    for method, against in HEADLINE_PAIRS:
        lines.append(f"| {NAMES[method]} − {NAMES[against]} | "
                     f"{interval_cells(headline_pairs(rows, task, r, method, against))} |")
    lr = headline_lr(rows, task, r, DEFAULT)
    lines += rank_map(next((row for row in sorted(rows, key=lambda row: row["seed"])
                            if cell(row) == (task, r, DEFAULT) and row["lr"] == lr and learned_on_val(row)), None),
                      heatmap)
    return lines


def quantized(rows: list[dict]) -> list[str]:
    """The 4-bit-base cell: each method's lr pick and accuracy, and the paired difference with its interval."""
    if not rows:
        return []
    task, r = QUANT_CELL
    lines = ["", f"### On a 4-bit base (QLoRA): {task}, r = {r}", "",
             "MiniLM's encoder linears loaded in 4-bit NF4 through bitsandbytes (float32 compute; the head stays "
             "float32 and starts from the same values as on the float base). PEFT LoRA runs as PEFT documents QLoRA: "
             "`prepare_model_for_kbit_training` (gradient checkpointing on), then `get_peft_model`, which puts its "
             "bitsandbytes LoRA layers on the 4-bit linears (checked at the start of every run). ElaLoRA runs the "
             "library defaults on the same base without that call. lr picked on validation at seed 0, as in the "
             "grid; seeds 1 and 2 at the pick. Runs: `nice python benchmarks/quality.py --base nf4`.", "",
             f"| method | lr (val, seed 0: {' / '.join(f'{lr:g}' for lr in LRS)}) | seeds | val @ {SETUP['steps']} | "
             "test | did not learn |", "|---|---|---|---|---|---|"]
    for method in QUANT_METHODS:
        seed0, runs = seed0_runs(rows, task, r, method), final_runs(rows, task, r, method)
        lr_cell = " / ".join(f"{seed0[lr]['val_final']:.3f}" if lr in seed0 else "–" for lr in sorted(seed0))
        learned = [row for row in runs if learned_on_val(row)]
        failed = [f"s{row['seed']}" for row in runs if not learned_on_val(row)]
        pick = f"**{runs[0]['lr']:g}**" if runs else "–"
        lines.append(f"| {NAMES[method]} | {pick} ({lr_cell}) | {len(runs)} | "
                     f"{mean_std([row['val_final'] for row in learned]) if learned else '–'} | "
                     f"{mean_std([row['test_accuracy'] for row in learned]) if learned else '–'} | "
                     f"{', '.join(failed) or 'none'} |")
    lines += ["", "| difference (test, points) | mean | 95% interval (t over seeds) | seeds ahead |", "|---|---|---|---|",
              f"| {NAMES[DEFAULT]} − {NAMES['lora']} | {interval_cells(paired(rows, task, r, DEFAULT, 'lora'))} |"]
    return lines


def rank_map(row: Optional[dict], heatmap: Path) -> list[str]:
    """One run's final rank per layer: a heatmap (a PNG written to ``heatmap``), the same numbers as a table
    (rows: transformer layers, columns: adapted matrices), and what each round moved."""
    if row is None:
        return []
    pattern = dict(zip(row["layers"], row["final_ranks"]))
    title = f"{NAMES[row['method']]}, seed {row['seed']}: final ranks ({row['rounds']} rounds moved {row['ranks_moved']})"
    plot_rank_heatmap(pattern, heatmap, title=title)
    layers, types, grid = rank_grid(pattern)
    net = sum(abs(rank - row["r"]) for rank in row["final_ranks"]) // 2  # ranks that ended somewhere else
    lines = ["", f"Final rank per layer, {NAMES[row['method']]}, seed {row['seed']} (started at {row['r']} each; "
             f"{row['rounds']} rounds moved {row['ranks_moved']} ranks, of which {net} ended in another matrix than "
             "they started in: the rest undid earlier moves):", "",
             f"![final rank per layer]({heatmap.name})", "",
             "| layer | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    lines += [f"| {layer} | " + " | ".join("" if x is None else str(x) for x in ranks) + " |"
              for layer, ranks in zip(layers, grid)]
    lines += ["", "Rounds of that run (step: layers that lost → layers that gained):", ""]
    for rec in row["rank_history"]:
        short = lambda names: ", ".join(".".join(split_name(n)) for n in names) or "–"  # noqa: E731
        lines.append(f"* step {rec['step']}: {short(rec['pruned'])} → {short(rec['expanded'])}")
    return lines


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace only the generated section between the quality markers (append it if absent)."""
    block = f"{BEGIN}\n{text}\n{END}"
    content = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if BEGIN in content and END in content:
        head, rest = content.split(BEGIN, 1)
        content = head + block + rest.split(END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(harness.TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jsonl", default=str(JSONL))
    p.add_argument("--limit", type=int, default=None, help="stop after this many runs")
    p.add_argument("--steps", type=int, default=None, help="a shorter run (smoke tests): its rows are kept apart")
    p.add_argument("--splits", default=None, help="task=val:test,... smaller splits (smoke tests)")
    p.add_argument("--write-md", action="store_true", help="write the tables from --jsonl into RESULTS.md")
    p.add_argument("--status", action="store_true", help="print how far the grid got")
    p.add_argument("--long", action="store_true", help=f"the longer cell ({LONG['steps']} steps) instead of the grid")
    p.add_argument("--base", choices=("nf4",), default=None, help="the 4-bit-base cell (QLoRA) instead of the grid")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setup = dict(SETUP)
    if args.steps:
        setup.update(steps=args.steps, eval_at=(args.steps,))
    if args.splits:
        splits = dict(SPLITS)
        for item in args.splits.split(","):
            task, sizes = item.split("=")
            splits[task] = tuple(int(x) for x in sizes.split(":"))
        setup["splits"] = splits
    jsonl = Path(args.jsonl)
    rows = read_rows(jsonl, setup)
    long_setup = dict(setup, steps=LONG["steps"], eval_at=LONG["eval_at"])
    quant_setup = dict(setup, base=QUANT["base"])
    if args.write_md:
        write_section(markdown(rows, setup, read_rows(jsonl, long_setup), read_rows(jsonl, quant_setup)))
        return 0
    tasks = args.tasks.split(",") if args.tasks else None
    methods = tuple(args.methods.split(","))
    planner = None
    if args.long:
        planner = plan_long
        setup = long_setup
    elif args.base:
        planner = functools.partial(plan, tasks=None, methods=QUANT_METHODS, blocks=[QUANT_CELL])
        setup = quant_setup
    if args.status:
        todo = (planner or (lambda done: plan(done, tasks, methods)))(read_rows(jsonl, setup))
        print(f"{len(read_rows(jsonl, setup))} runs done; {len(todo)} can start now")
        return 0
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    work(jsonl, setup, tasks, methods, args.limit, planner)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
