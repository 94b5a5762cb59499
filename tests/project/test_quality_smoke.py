"""benchmarks/quality.py: the grid's plan (lr picked on validation, then the other seeds), workers that share it,
the tables (runs that did not learn flagged, paired differences), and every method trained briefly on its
authors' objective."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality  # noqa: E402


def _row(method, lr, seed, val, test, task="movies", r=8, majority=0.52, peaks=(8, 8)):
    row = dict(task=task, r=r, method=method, lr=lr, seed=seed, val_final=val,
               val_curve={str(t): val for t in quality.SETUP["eval_at"]}, test_accuracy=test, test_majority=majority,
               adapter_params=1, trainable_params=1,
               optimizer_state_bytes=1, train_cpu_seconds=1.0, setup=quality.SETUP)
    if method in ("lora", "adalora"):
        row["loss_beyond_ce"] = 0.0 if method == "lora" else 1.25
    if method in quality.ELALORA:
        row.update(peak_ranks=list(peaks), passed_over=["b"] if max(peaks) == 2 * r else [], r_max=2 * r)
    return row


def test_plan_picks_the_lr_on_validation_then_runs_the_other_seeds_at_it():
    low, high = quality.LRS
    rows = [_row("lora", low, 0, val=0.80, test=0.70), _row("lora", high, 0, val=0.78, test=0.99)]
    assert quality.picked_lr(rows, "movies", 8, "lora") == low  # the test split never decides
    todo = quality.plan(rows, tasks=["movies"], methods=("lora", "adalora"))
    assert {(s["method"], s["lr"], s["seed"]) for s in todo if s["r"] == 8} == {
        ("lora", low, 1), ("lora", low, 2), ("adalora", low, 0), ("adalora", high, 0)}
    assert quality.picked_lr(rows[:1], "movies", 8, "lora") is None  # until both lrs ran
    tie = [_row("lora", low, 0, 0.8, 0.5), _row("lora", high, 0, 0.8, 0.9)]
    assert quality.picked_lr(tie, "movies", 8, "lora") == low


def test_a_method_that_collapses_at_both_lrs_gets_the_fallback_lrs_judged_on_validation():
    low, high = quality.LRS
    first, second = quality.FALLBACK_LRS
    majority = quality.val_majority("tweets", *quality.SPLITS["tweets"])  # 0.678: tweets are mostly positive
    stuck = [_row("lora", low, 0, majority, 0.99, task="tweets"), _row("lora", high, 0, majority + 0.01, 0.99,
                                                                        task="tweets")]
    assert quality.picked_lr(stuck, "tweets", 8, "lora") is None  # a high test accuracy never rescues a run
    assert ("lora", first, 0) in {(s["method"], s["lr"], s["seed"]) for s in quality.plan(stuck, ["tweets"], ("lora",))}
    still = stuck + [_row("lora", first, 0, majority, 0.5, task="tweets")]
    assert quality.lrs_to_try(still, "tweets", 8, "lora") == [low, high, first, second]
    learned = still + [_row("lora", second, 0, 0.85, 0.5, task="tweets")]
    assert quality.picked_lr(learned, "tweets", 8, "lora") == second
    assert quality.picked_lr(stuck + [_row("lora", first, 0, 0.9, 0.5, task="tweets")], "tweets", 8, "lora") == first
    # one lr learned: no fallback, and the pick is among the lrs that learned
    fine = [_row("lora", low, 0, 0.80, 0.5, task="tweets"), _row("lora", high, 0, majority, 0.5, task="tweets")]
    assert quality.lrs_to_try(fine, "tweets", 8, "lora") == [low, high]
    assert quality.picked_lr(fine, "tweets", 8, "lora") == low


def test_a_claim_keeps_workers_apart_and_a_dead_workers_claim_is_taken_over(tmp_path):
    spec = dict(task="movies", r=8, method="lora", lr=0.002, seed=0)
    assert quality.claim(tmp_path, spec)
    assert not quality.claim(tmp_path, spec)  # this process is alive: taken
    (claim,) = tmp_path.iterdir()
    claim.write_text(str(2**22 + 12345))  # no such process
    assert quality.claim(tmp_path, spec)
    assert claim.read_text() == str(os.getpid())


def test_work_appends_one_row_per_run_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(quality.harness, "load_task", lambda task, n_val, n_test: {})
    monkeypatch.setattr(quality, "run_one", lambda spec, data, setup: {
        **_row(spec["method"], spec["lr"], spec["seed"], val=0.8 + spec["lr"], test=0.9, task=spec["task"],
               r=spec["r"]), "setup": setup})
    jsonl = tmp_path / "q.jsonl"
    assert quality.work(jsonl, quality.SETUP, tasks=["tweets"], methods=("lora",), limit=3) == 3
    # 2 ranks × (2 lrs + 2 seeds), and at r = 2 (a headline cell) seeds 3 to 9
    assert quality.work(jsonl, quality.SETUP, tasks=["tweets"], methods=("lora",)) == 12
    rows = quality.read_rows(jsonl)
    assert len(rows) == 15 and len({quality.run_key(row) for row in rows}) == 15
    assert quality.work(jsonl, quality.SETUP, tasks=["tweets"], methods=("lora",)) == 0
    assert not list(jsonl.with_suffix(".claims").iterdir())  # claims released


def test_the_table_flags_runs_that_did_not_learn_and_pairs_seeds():
    low, high = quality.LRS
    rows = [_row("lora", low, 0, 0.80, 0.80), _row("lora", high, 0, 0.70, 0.70),
            _row("lora", low, 1, 0.80, 0.82), _row("lora", low, 2, 0.80, 0.84),
            _row("elalora-paper", low, 0, 0.60, 0.60), _row("elalora-paper", high, 0, 0.82, 0.83),
            _row("elalora-paper", high, 1, 0.82, 0.85, peaks=(11, 6)), _row("elalora-paper", high, 2, 0.53, 0.53),
            _row("elalora-paper-fixed", high, 0, 0.82, 0.85, peaks=(16, 16))]
    text = quality.markdown(rows)
    (line,) = [x for x in text.splitlines() if x.startswith('| 8 | ElaLoRA, init="paper" | **')]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2].startswith(f"**{high:g}**") and cells[3] == "3"
    assert cells[6] == "0.840 ± 0.014"  # seeds 0 and 1 only: seed 2 stayed at the majority class
    assert cells[7] == "+3.0 ± 0.0 (2/2)"  # paired with LoRA's seeds 0 and 1: +3, +3
    assert cells[8] == "s2"
    assert "LoRA (peft), 4 runs: loss − cross-entropy = 0.000000 … 0.000000" in text
    (line,) = [x for x in text.splitlines() if x.startswith("| 8 | 4 runs |")]  # reallocation-off runs excluded
    assert line.endswith("| 11 | 1 (cap 10) | 0 (cap 12) | 0 (cap 16) |")


def test_paired_differences_per_cell_and_pooled_answer_which_start():
    """zero_p − paper: per seed at each method's own picked lr, a seed that did not learn left out, then pooled."""
    low, high = quality.LRS
    rows = []
    for task, r, seeds in (("movies", 8, {0: (0.80, 0.83), 1: (0.81, 0.80)}), ("tweets", 2, {0: (0.70, 0.74)})):
        for method, pick in (("elalora-paper", low), ("elalora-zero_p", high)):
            other = high if pick == low else low
            rows.append(_row(method, other, 0, 0.75, 0.99, task=task, r=r))  # the lr not picked: never counted
            for seed, accs in seeds.items():
                acc = accs[method == "elalora-zero_p"]
                rows.append(_row(method, pick, seed, 0.8, acc, task=task, r=r))
    rows.append(_row("elalora-zero_p", high, 2, 0.53, 0.90, task="movies", r=8))  # did not learn, on validation
    rows.append(_row("elalora-paper", low, 2, 0.8, 0.90, task="movies", r=8))
    assert [round(d, 3) for d in quality.paired(rows, "movies", 8, "elalora-zero_p", "elalora-paper")] == [0.03, -0.01]
    (line,) = [x for x in quality.markdown(rows).splitlines() if x.startswith('| ElaLoRA, init="zero_p" − ElaLoRA, '
                                                                             'init="paper", test')]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1:] == ["+1.0 ± 2.8 (1/2)", "–", "–", "+4.0 (1/1)", "+2.0 ± 2.6 (2/3)"]


@pytest.mark.slow
def test_every_method_trains_on_its_authors_objective_and_its_loss_falls(one_thread):
    """LoRA's loss is the plain cross-entropy and AdaLoRA's carries PEFT's orthogonality penalty (a harness that
    called the base model directly once dropped it); on 16 sentences seen 20 times every loss must fall by a
    fifth (measured: LoRA and AdaLoRA by more than half, ElaLoRA's paper start, the slowest, by 41%)."""
    setup = dict(quality.SETUP, steps=40, batch_size=8, eval_at=(40,), splits={"tweets": (16, 16)})
    data = quality.harness.load_task("tweets", 16, 16)
    data["train"] = data["train"].first(16)
    for method in quality.METHODS:
        row = quality.run_one(dict(task="tweets", r=2, method=method, lr=5e-3, seed=0), data, setup)
        assert row["loss_curve"][-1] < 0.8 * row["loss_curve"][0], (method, row["loss_curve"])
        if method == "lora":
            assert row["loss_beyond_ce"] == 0
        elif method == "adalora":
            assert row["loss_beyond_ce"] > 1e-4
        else:
            assert (row["ranks_moved"] > 0) == ("fixed" not in method), method  # b = 0: no round moves a rank
        assert row["adapter_params"] > 0 and row["optimizer_state_bytes"] > 0 and row["val_final"] == row["val_curve"]["40"]
        json.dumps(row)  # a JSONL row


def test_adalora_without_task_type_would_be_caught(monkeypatch):
    """The check in run_one: a PEFT AdaLoRA whose loss carries no penalty stops the run."""
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels):
            logits = torch.zeros(len(labels), 2)
            return type("Out", (), {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)})

    monkeypatch.setattr(quality, "build", lambda *a: quality.Run(Plain()))
    batch = dict(input_ids=torch.zeros(32, 3, dtype=torch.long), attention_mask=torch.ones(32, 3, dtype=torch.long),
                 labels=torch.zeros(32, dtype=torch.long))
    data = {"train": type("D", (), {"batch": lambda self, index: batch, "__len__": lambda self: 32})()}
    with pytest.raises(RuntimeError, match="not its authors' objective"):
        quality.run_one(dict(task="movies", r=2, method="adalora", lr=1e-3, seed=0), data, quality.SETUP)


def test_headline_pairs_run_reallocation_off_at_the_defaults_lr_and_report_a_t_interval():
    """The ablation's arms share one lr (the default's validation pick), whatever lr reallocation off would pick;
    the interval is Student's t over seeds."""
    low, high = quality.LRS
    fixed = f"{quality.DEFAULT}-fixed"
    rows = [_row(quality.DEFAULT, low, 0, 0.70, 0.5, r=2), _row(quality.DEFAULT, high, 0, 0.80, 0.5, r=2),
            _row(fixed, low, 0, 0.90, 0.5, r=2), _row(fixed, high, 0, 0.60, 0.5, r=2)]
    assert quality.picked_lr(rows, "movies", 2, fixed) == low and quality.headline_lr(rows, "movies", 2, fixed) == high
    todo = {(s["method"], s["lr"], s["seed"]) for s in quality.plan(rows, ["movies"], (quality.DEFAULT, fixed))
            if s["r"] == 2}
    assert (fixed, high, 9) in todo and (fixed, low, 9) not in todo and (quality.DEFAULT, high, 9) in todo
    for seed, (mine, theirs) in enumerate([(0.85, 0.84), (0.86, 0.83), (0.84, 0.84)], start=1):
        rows += [_row(quality.DEFAULT, high, seed, 0.8, mine, r=2), _row(fixed, high, seed, 0.8, theirs, r=2)]
    rows += [_row(fixed, low, 1, 0.8, 0.99, r=2)]  # reallocation off at its own pick: never paired
    diffs = quality.headline_pairs(rows, "movies", 2, quality.DEFAULT, fixed)
    assert [round(d, 3) for d in diffs] == [0.0, 0.01, 0.03, 0.0]
    low_ci, high_ci = quality.t_interval(diffs)
    assert round(high_ci - 0.01, 5) == round(0.01 - low_ci, 5) == round(3.182 * 0.014142 / 2, 5)
    assert "| +1.00 | [-1.25, +3.25] | 2/4 | none |" in "\n".join(quality.headline(rows))


def test_the_long_cell_picks_its_own_lrs_on_validation_then_runs_three_seeds_per_arm():
    """750 steps need not learn at the 250-step picks: the default and LoRA select again (seed 0, validation);
    then the three headline arms run seeds 0-2, reallocation off at the default's pick."""
    low, high = quality.LRS
    fixed = f"{quality.DEFAULT}-fixed"
    todo = {(s["method"], s["lr"], s["seed"]) for s in quality.plan_long([])}
    assert todo == {(m, lr, 0) for m in (quality.DEFAULT, "lora") for lr in (low, high)}
    rows = [_row(quality.DEFAULT, high, 0, 0.53, 0.48, r=2), _row(quality.DEFAULT, low, 0, 0.80, 0.8, r=2),
            _row("lora", high, 0, 0.53, 0.48, r=2), _row("lora", low, 0, 0.79, 0.8, r=2)]  # 5e-3 did not learn
    todo = {(s["method"], s["lr"], s["seed"]) for s in quality.plan_long(rows)}
    assert todo == {(m, low, s) for m in (quality.DEFAULT, "lora") for s in (1, 2)} | {(fixed, low, s) for s in (0, 1, 2)}


def test_the_long_cell_reports_one_seeds_final_rank_per_layer_and_its_rounds(tmp_path):
    names = [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in ("query", "value")]
    curve = {str(t): 0.8 for t in quality.LONG["eval_at"]}
    row = _row(quality.DEFAULT, 5e-3, 0, 0.8, 0.85, r=2)
    row.update(layers=names, final_ranks=[1, 3, 2, 2], rounds=1, ranks_moved=1, val_curve=curve,
               rank_history=[dict(step=120, pruned={names[0]: 1}, expanded={names[1]: 1}, ranks=[1, 3, 2, 2])])
    other = _row(quality.DEFAULT, 2e-3, 0, 0.7, 0.80, r=2)  # the lr not picked
    other["val_curve"] = curve
    text = "\n".join(quality.long_cell([row, other], tmp_path / "ranks.png"))
    assert "| 0 | 1 | 3 |" in text and "| 1 | 2 | 2 |" in text
    assert "* step 120: 0.attention.self.query → 0.attention.self.value" in text
    assert "**0.005** (0.005: 0.800 / 0.002: 0.700)" in text and "![final rank per layer](ranks.png)" in text
    assert (tmp_path / "ranks.png").read_bytes().startswith(b"\x89PNG")


def test_the_4bit_cell_reports_each_pick_and_the_paired_difference_with_its_interval():
    low, high = quality.LRS
    rows = [_row(quality.DEFAULT, low, 0, 0.82, 0.82), _row(quality.DEFAULT, high, 0, 0.53, 0.48),  # 5e-3 collapsed
            _row("lora", low, 0, 0.80, 0.80), _row("lora", high, 0, 0.81, 0.81)]
    rows += [_row(quality.DEFAULT, low, s, 0.8, acc) for s, acc in ((1, 0.84), (2, 0.83))]
    rows += [_row("lora", high, s, 0.8, acc) for s, acc in ((1, 0.82), (2, 0.82))]
    text = "\n".join(quality.quantized(rows))
    assert '| ElaLoRA, init="zero_p" | **0.002** (0.820 / 0.530) | 3 |' in text
    assert "| LoRA (peft) | **0.005** (0.800 / 0.810) | 3 |" in text
    # per seed +1, +2, +1 points: mean 1.33, t(2) = 4.303, sd 0.577 -> half-width 1.43
    assert "| +1.33 | [-0.10, +2.77] | 3/3 |" in text


@pytest.mark.slow
def test_a_4bit_run_puts_both_methods_on_bitsandbytes_layers(one_thread):
    """The QLoRA cell's check: PEFT's LoRA layers and ElaLoRA's both sit on Linear4bit bases; a few steps with an
    evaluation in the middle train (bitsandbytes' CPU inference repack is off for both)."""
    pytest.importorskip("bitsandbytes")
    setup = dict(quality.QUANT, steps=4, batch_size=8, eval_at=(2, 4), splits={"movies": (16, 16)})
    data = quality.harness.load_task("movies", 16, 16)
    for method, layer in (("lora", "peft.tuners.lora.bnb.Linear4bit"), (quality.DEFAULT, "elalora.layer.ElaLoRALinear")):
        row = quality.run_one(dict(task="movies", r=8, method=method, lr=2e-3, seed=0), data, setup)
        assert row["adapted_layer_types"] == [layer]
        assert set(row["val_curve"]) == {"2", "4"}
