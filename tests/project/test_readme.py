"""Every ```python block of the README runs as written, top to bottom in one namespace (as a reader would).

A block may opt out only with a first line ``# readme-test: skip (<reason>)``.
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).parents[2] / "README.md"
SKIP = re.compile(r"# readme-test: skip \(.+\)")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_readme_has_the_usage_examples():
    blocks = python_blocks()
    assert len(blocks) >= 4  # plain PyTorch, Hugging Face, Trainer, save/load
    assert all(not b.startswith("# readme-test: skip") or SKIP.match(b.splitlines()[0]) for b in blocks), (
        "a skipped block must give its reason: # readme-test: skip (<reason>)")


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys, one_thread):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # anything a block writes stays out of the checkout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no block may download
    namespace: dict = {}
    for index, block in enumerate(python_blocks()):
        if SKIP.match(block.splitlines()[0]):
            continue
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    assert "RoundRecord" in capsys.readouterr().out  # the first block printed a round
