"""Writes the CPU section of benchmarks/RESULTS.md from the JSON of the pytest-benchmark suite.

    make bench    # pytest benchmarks --benchmark-json=benchmarks/cpu_results.json, then this script
    python benchmarks/compare.py benchmarks/cpu_results.json [--no-write]

Every number of the section comes from that JSON. In the suite, contenders
alternate: pass i times each contender of a comparison once in turn (a few
rounds each), so load from other processes hits all of them alike. A ratio is
the median over passes of the per-pass ratio of median round times. Only the
text between ``<!-- cpu:begin -->`` and ``<!-- cpu:end -->`` of RESULTS.md is
rewritten (``<!-- cpu-steps:begin -->`` for a run of the whole-step cases
alone); the rest is kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

# The whole suite's run writes the cpu block; a run of the whole-step cases alone
# (make bench PYTEST_ARGS="-k 'llama or step'") writes its own block and leaves that one.
BLOCKS = {"cpu": "## CPU (C++ extension and torch ops)", "cpu-steps": "## CPU, whole training steps side by side"}
RESULTS = Path(__file__).parent / "RESULTS.md"
OURS = "elalora (C++)"
MEMCPY, TCOPY = "memcpy 24 B/elem", "torch copy_ 24 B/elem"
BASE = "base nn.Linear"

med = statistics.median


def mark(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


class Run:
    """The suite's JSON by group → pass → contender, keeping every round time and extra_info."""

    def __init__(self, data: dict):
        self.meta = data["elalora"]
        self.machine = data["machine_info"]
        self.commit = data.get("commit_info", {})
        self.rounds = defaultdict(lambda: defaultdict(dict))  # group -> pass -> contender -> [s]
        self.extra = defaultdict(dict)  # (group, contender) -> extra_info of its last pass
        for b in sorted(data["benchmarks"], key=lambda b: b["params"].get("pass_", 0)):
            who = b["params"].get("impl") or b["params"]["part"]
            self.rounds[b["group"]][b["params"].get("pass_", 0)][who] = b["stats"]["data"]
            self.extra[b["group"], who] = b["extra_info"]

    def seconds(self, group: str, who: str) -> float:
        """Median over every round of every pass."""
        return med([t for p in self.rounds[group].values() for t in p[who]])

    def per_pass(self, group: str, value) -> float:
        """Median over passes of value({contender: median round time of the pass})."""
        return med([value({w: med(ts) for w, ts in p.items()}) for p in self.rounds[group].values()])

    def ratio(self, group: str, a: str, b: str) -> float:
        return self.per_pass(group, lambda m: m[a] / m[b])


def score_tables(run: Run, lines: list[str]) -> list[tuple[str, bool]]:
    threads = run.meta["threads"]
    targets, main, floor = [], [], []
    sets = dict.fromkeys(g.split("score+EMA ", 1)[1].rsplit(",", 1)[0] for g in run.rounds if g.startswith("score+EMA "))
    compile_notes = []
    for set_name in sets:
        g = f"score+EMA {set_name}, {threads} threads"
        total = run.extra[g, OURS]["elements"]
        ms = {w: f"{run.seconds(g, w) * 1e3:.2f} ms" for w in (OURS, "peft update_ipt", "compiled in-place")}
        vs_peft = run.ratio(g, "peft update_ipt", OURS)
        vs_comp = run.ratio(g, "compiled in-place", OURS)
        main.append(
            f"| {set_name} | {total / 1e6:.2f} M | {ms[OURS]} | {ms['peft update_ipt']} | {ms['compiled in-place']} "
            f"| {vs_peft:.1f}× {mark(vs_peft >= 10)} | {vs_comp:.2f}× {mark(vs_comp >= 1.0)} |"
        )
        compile_notes.append(f"{set_name} {run.extra[g, 'compiled in-place']['compile_s']:.0f} s")
        targets += [
            (f"score+EMA {set_name}: ≥ 10× PEFT update_ipt ({vs_peft:.1f}×)", vs_peft >= 10),
            (f"score+EMA {set_name}: ≥ 1.0× compiled in-place ({vs_comp:.2f}×)", vs_comp >= 1.0),
        ]
        for t in sorted({1, threads}):
            g = f"score+EMA {set_name}, {t} threads"
            of_floor = run.per_pass(g, lambda m: min(m[MEMCPY], m[TCOPY]) / m[OURS])
            gbs = 24 * total / run.seconds(g, OURS) / 1e9
            fms = {w: f"{run.seconds(g, w) * 1e3:.2f} ms" for w in (OURS, MEMCPY, TCOPY)}
            floor.append(
                f"| {set_name} | {t} | {fms[OURS]} | {fms[MEMCPY]} | {fms[TCOPY]} | {gbs:.1f} | "
                f"{of_floor:.0%} {mark(of_floor >= 0.85)} |"
            )
            targets.append(
                (f"score+EMA {set_name}, {t} thread(s): ≥ 85% of one memcpy of its bytes ({of_floor:.0%})", of_floor >= 0.85)
            )
    lines += [
        "### Score + EMA update (docs/ALGORITHM.md §2), all adapter tensors of a model per call",
        "",
        "float32 parameters and gradients, float32 EMAs in two flat buffers (as the allocator holds them), "
        f"{threads} threads. *peft update_ipt* is PEFT's own `RankAllocator.update_ipt` (per-tensor, out-of-place); "
        "*compiled in-place* is `torch.compile` (inductor) of an in-place eager loop with the same "
        f"non-finite guard and count, over the whole list in one graph (compile time excluded: {', '.join(compile_notes)}).",
        "",
        "| adapter set | elements | elalora | peft update_ipt | compiled in-place | vs PEFT (≥ 10×) | vs compiled (≥ 1.0×) |",
        "|---|---|---|---|---|---|---|",
        *main,
        "",
        "**Against the memory floor.** The op must move 24 B/element (read w, g, Ī, Ū; write Ī, Ū). "
        "The floor is one copy of the same bytes (12 B/element read, 12 written) in the same run, "
        "alternating with the op: *memcpy* is libc `memcpy` (at 2 threads the same copy cut in two halves, "
        "one `memcpy` call per thread), *torch copy_* is `Tensor.copy_` of one tensor on torch's threads. "
        "*of floor* is the median over passes of (the faster copy of the pass) / elalora.",
        "",
        "| adapter set | threads | elalora | memcpy | torch copy_ | elalora GB/s | of floor (≥ 85%) |",
        "|---|---|---|---|---|---|---|",
        *floor,
        "",
    ]
    return targets


def adapter_table(run: Run, lines: list[str]) -> list[tuple[str, bool]]:
    targets, rows, overheads = [], [], []
    for g in (g for g in run.rounds if g.startswith("adapter fwd+bwd ")):
        n, d, r = (int(part.split("=")[1]) for part in g.split()[2:])
        ours, lora, ada = (run.ratio(g, w, BASE) for w in ("elalora", "peft LoRA", "peft AdaLoRA"))
        rows.append(
            f"| {n} | {d} | {r} | {run.seconds(g, BASE) * 1e3:.1f} ms | {ours:.3f} | {lora:.3f} | {ada:.3f} | {mark(ours <= lora)} |"
        )
        targets.append((f"adapter N={n} d={d} r={r}: elalora/base {ours:.3f} ≤ LoRA/base {lora:.3f}", ours <= lora))
        overheads.append((ours - 1, lora - 1))
    ours_median, lora_median = med([o for o, _ in overheads]), med([lo for _, lo in overheads])
    targets.append(
        (f"adapter: median overhead ≤ half of PEFT LoRA's ({ours_median:.1%} vs {lora_median / 2:.1%})",
         ours_median <= lora_median / 2)
    )
    lines += [
        "### Adapter linear, forward + backward of one layer",
        "",
        "x [N, d] requiring grad (as inside a network), frozen d×d base with bias, float32, no dropout; "
        "elalora is `ElaLoRALinear` (r active of r_max = 2r slots, through the dispatch), PEFT's layers "
        "are `peft.tuners.lora.Linear` and `peft.tuners.adalora.SVDLinear`. Times are medians; "
        "ratios are over the frozen base `nn.Linear` alone, median over passes of the per-pass ratio.",
        "",
        "| N | d | r | base | elalora / base | PEFT LoRA / base | PEFT AdaLoRA / base | target: elalora ≤ LoRA |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Median overhead over the base across the {len(rows)} shapes: elalora {ours_median:.1%}, PEFT LoRA {lora_median:.1%}.",
        "",
    ]
    return targets


def step_table(run: Run, lines: list[str]) -> list[tuple[str, bool]]:
    g, ga = "MiniLM-L6 training step", "elalora allocator on MiniLM-L6"
    ours, ada = run.ratio(g, "elalora", "peft LoRA"), run.ratio(g, "peft AdaLoRA", "peft LoRA")
    score_ms, round_ms, scores_ms = (run.seconds(ga, w) * 1e3 for w in ("score update", "round", "rank scores"))

    def in_run(who, key):
        s = run.extra[g, who].get(key)
        return f"{s * 1e3:.1f} ms" if s is not None else "n/a"

    passes = len(run.rounds[g])
    own_ms = round_ms - score_ms - scores_ms
    own = f"{own_ms:.1f} ms" if own_ms > 0 else "not separable in this run: its parts' medians add up to more than the round's"
    lines += [
        "### Whole training step, MiniLM-L6 (BertForSequenceClassification)",
        "",
        "36 adapted matrices (query, key, value, attention output, intermediate, output), batch 32×64, "
        "AdamW, r = 8 (elalora: r_max = 16, allocator.step() every step, rounds every 5 steps, "
        "`allocator.orth_penalty()` in the loss; PEFT LoRA and AdaLoRA wrapped with `task_type=\"SEQ_CLS\"`; "
        "AdaLoRA: init_r 12 → target_r 8, `update_and_allocate` every step, orthogonality penalty inside its "
        f"forward). The three models step in turn, {passes} passes.",
        "",
        "| | s/step | over PEFT LoRA | per-step bookkeeping | per round |",
        "|---|---|---|---|---|",
        f"| PEFT LoRA r=8 | {run.seconds(g, 'peft LoRA'):.2f} | 1.00 | – | – |",
        f"| elalora r=8 | {run.seconds(g, 'elalora'):.2f} | {ours:.3f} | {score_ms:.2f} ms "
        f"({in_run('elalora', 'bookkeeping_s')} in the run) | {round_ms:.1f} ms ({in_run('elalora', 'round_s')} in the run) |",
        f"| PEFT AdaLoRA | {run.seconds(g, 'peft AdaLoRA'):.2f} | {ada:.3f} | {in_run('peft AdaLoRA', 'bookkeeping_s')} "
        f"| {in_run('peft AdaLoRA', 'round_s')} |",
        "",
        "Bookkeeping and round columns for elalora: median of 40 `allocator.step()` calls on the same "
        "model after a real step (the round figure includes that step's score update), and in brackets "
        "the median of the steps of the training run above.",
        f"A round ({round_ms:.1f} ms) is the step's score update ({score_ms:.2f} ms, C++ extension), the rank "
        f"scores ({scores_ms:.2f} ms, the CPU backend's per-matrix `rank_scores`) and the allocator's own work "
        f"({own}; plan, slot swaps, and a `torch.linalg.qr` per new P column and Q row in "
        "`elalora/allocator.py::_orthogonal_unit`).",
        "",
    ]
    return [
        (f"whole step: elalora ≤ 1.00× PEFT LoRA ({ours:.3f}×)", ours <= 1.0),
        (f"whole step: elalora ≤ 0.90× PEFT LoRA ({ours:.3f}×)", ours <= 0.90),
        (f"per-step bookkeeping ≤ 2 ms ({score_ms:.2f} ms)", score_ms <= 2.0),
        (f"reallocation round ≤ 20 ms ({round_ms:.1f} ms)", round_ms <= 20.0),
    ]


LLAMA_STEP, LLAMA_PARTS = "Llama-shaped training step ", "elalora per-step work, Llama-shaped"
FLOOR = "frozen floor"


def llama_tables(run: Run, lines: list[str]) -> list[tuple[str, bool]]:
    targets, rows = [], []
    steps = [g for g in run.rounds if g.startswith(LLAMA_STEP)]
    for g in steps:
        tokens = g[len(LLAMA_STEP):]
        ours = run.ratio(g, "elalora", "peft LoRA")
        # The adapters' own cost: each method's step minus the frozen floor's, in the same pass.
        over = run.per_pass(g, lambda m: (m["elalora"] - m[FLOOR]) / (m["peft LoRA"] - m[FLOOR]))
        ms = {w: f"{run.seconds(g, w) * 1e3:.0f} ms" for w in (FLOOR, "peft LoRA", "elalora")}
        rows.append(f"| {tokens} | {ms[FLOOR]} | {ms['peft LoRA']} | {ms['elalora']} | {ours:.3f} {mark(ours <= 0.90)} | {over:.2f} |")
        targets.append((f"Llama-shaped step {tokens}: elalora ≤ 0.90× PEFT LoRA ({ours:.3f}×)", ours <= 0.90))
    if steps:
        lines += [
            "### Whole training step, Llama-shaped causal LM",
            "",
            "`LlamaForCausalLM` built from a `LlamaConfig` (hidden 512, MLP 1376, 4 layers, 8 heads, vocabulary "
            "8000, no weights loaded), 28 adapted matrices (q, k, v, o, gate, up, down), r = 16, AdamW, "
            f"{run.meta['threads']} threads. elalora: r_max = 32, `allocator.orth_penalty()` in the loss, "
            "`allocator.step()` every step (score update; no round falls in the run); PEFT LoRA: r = 16 on the same "
            "projections. The frozen floor is the model with no adapter and every weight frozen, input embeddings "
            "requiring grad: forward and the activation-gradient (dx) backward only, no optimizer. The three step "
            f"in turn, {len(run.rounds[steps[0]])} passes per size. *Adapter cost* is (elalora − floor) / "
            "(PEFT LoRA − floor), median over passes.",
            "",
            "| tokens per step | frozen floor | PEFT LoRA | elalora | elalora / PEFT LoRA (≤ 0.90) | adapter cost, elalora / LoRA |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    if LLAMA_PARTS in run.rounds:
        ms = {part: run.seconds(LLAMA_PARTS, part) * 1e3 for part in run.rounds[LLAMA_PARTS][0]}
        # The fastest call too: on cores shared with other work a 2-thread call's median mostly measures waiting.
        fastest = {part: min(t for p in run.rounds[LLAMA_PARTS].values() for t in p[part]) * 1e3 for part in ms}
        step_ms = run.seconds(LLAMA_STEP + "4x128", "elalora") * 1e3 if LLAMA_STEP + "4x128" in run.rounds else None
        share = lambda x: f"{x / step_ms:.1%}" if step_ms else "n/a"  # noqa: E731
        spare = ms["AdamW, r_max = 2r slots"] - ms["AdamW, r slots"]
        rows = [f"| {part} | {t:.3f} ms | {fastest[part]:.3f} ms | {share(t)} |" for part, t in ms.items()]
        in_steps = run.extra.get((LLAMA_STEP + "4x128", "elalora"), {}).get("bookkeeping_s")
        if in_steps is not None:
            rows.append(f"| allocator.step, no round, inside the 4×128 training steps | {in_steps * 1e3:.3f} ms | – | {share(in_steps * 1e3)} |")
        lines += [
            "### elalora's own per-step work on the Llama-shaped model",
            "",
            "Medians of 20 calls per pass on the model above after one real step (gradients and AdamW state "
            "present); the penalty's gradients are taken with `torch.autograd.grad`. The AdamW rows step copies "
            "of the 28 adapters' P, λ, Q with r_max = 32 slots and with 16: their difference is what the spare "
            "slots cost the optimizer. *Share* is of elalora's whole 4×128 step in this run.",
            "",
            "| part | median | fastest call | median's share of the 4×128 step |",
            "|---|---|---|---|",
            *rows,
            f"| AdamW's cost of the spare slots (2r row − r row) | {spare:.3f} ms | "
            f"{fastest['AdamW, r_max = 2r slots'] - fastest['AdamW, r slots']:.3f} ms | {share(spare)} |",
            "",
        ]
        pen, alloc = ms["orth penalty fwd+bwd"], ms["allocator.step, no round"]
        targets += [
            (f"Llama-shaped set: orthogonality penalty forward + backward ≤ 1 ms (median {pen:.2f} ms, "
             f"fastest {fastest['orth penalty fwd+bwd']:.2f} ms)", pen <= 1.0),
            (f"Llama-shaped set: allocator.step without a round ≤ 0.3 ms (median {alloc:.3f} ms, "
             f"fastest {fastest['allocator.step, no round']:.3f} ms)", alloc <= 0.3),
        ]
    return targets


def block_of(run: Run) -> str:
    kernels = any(g.startswith(("score+EMA ", "adapter fwd+bwd ")) for g in run.rounds)
    return "cpu" if kernels else "cpu-steps"


def make_command(run: Run, json_name: str) -> str:
    if block_of(run) == "cpu":
        return "make bench"
    return f"make bench PYTEST_ARGS=\"-k 'llama or step'\" BENCH_JSON={json_name}"


def section(run: Run, json_name: str) -> str:
    m, cpu = run.meta, run.machine.get("cpu", {})
    loads = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    commit = run.commit.get("id", "?")[:10] + (" + uncommitted changes" if run.commit.get("dirty") else "")
    lines = [
        BLOCKS[block_of(run)],
        "",
        f"Machine: {cpu.get('brand_raw', 'unknown CPU')}, {m['cpu_count']} cores visible, torch {m['torch']} "
        f"({m['threads']} threads unless a table says otherwise), Python {run.machine['python_version']}. "
        f"C++ extension: {m['extension']}. Commit {commit}.",
        f"Run: `{make_command(run, json_name)}` (`{m['command']}`, then `python benchmarks/compare.py {json_name}`), "
        f"{m['started']} to {m['finished']}. Load average over 1 / 5 / 15 min (as `uptime` prints it): "
        f"{loads(m['load_start'])} at the start, {loads(m['load_end'])} at the end, on {m['cpu_count']} cores.",
        "Absolute times move with the load of other processes on these cores; the ratios come from contenders "
        "measured in the same run, alternating pass by pass.",
        "",
    ]
    targets = []
    if any(g.startswith("score+EMA ") for g in run.rounds):
        targets += score_tables(run, lines)
    if any(g.startswith("adapter fwd+bwd ") for g in run.rounds):
        targets += adapter_table(run, lines)
    if "MiniLM-L6 training step" in run.rounds:
        targets += step_table(run, lines)
    targets += llama_tables(run, lines)
    lines += ["### Targets (issues 3, 14 and 28)", "", *(f"* {mark(ok)}: {what}" for what, ok in targets)]
    return "\n".join(lines)


def write_section(text: str, name: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="the file pytest wrote with --benchmark-json")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    run = Run(json.loads(args.json.read_text()))
    text = section(run, args.json.as_posix())
    print(text)
    if not args.no_write:
        write_section(text, block_of(run))
        print(f"wrote the {block_of(run)} section of {RESULTS}")


if __name__ == "__main__":
    main()
