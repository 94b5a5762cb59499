"""Rank plots and `python -m elalora plot RUN_DIR`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import matplotlib
import pytest

matplotlib.use("Agg")

from elalora import viz  # noqa: E402
from elalora.cli import main  # noqa: E402
from elalora.run_records import load_run, run_record  # noqa: E402

TYPES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense"]
NAMES = [f"bert.encoder.layer.{i}.{t}" for i in range(3) for t in TYPES]
PNG = b"\x89PNG\r\n\x1a\n"


def record():
    ranks0 = [4] * len(NAMES)
    r1 = list(ranks0)
    r1[0], r1[4] = 3, 5
    r2 = list(r1)
    r2[1], r2[10] = 2, 6
    history = [
        {"step": 5, "budget": 1, "pruned": {NAMES[0]: 1}, "expanded": {NAMES[4]: 1}, "passed_over": [], "ranks": r1},
        {"step": 8, "budget": 2, "pruned": {NAMES[1]: 2}, "expanded": {NAMES[10]: 2}, "passed_over": [], "ranks": r2},
    ]
    return {"layers": NAMES, "initial_ranks": dict(zip(NAMES, ranks0)), "rank_pattern": dict(zip(NAMES, r2)),
            "history": history}


def test_split_name_and_grid():
    assert viz.split_name("bert.encoder.layer.11.attention.self.query") == ("11", "attention.self.query")
    assert viz.split_name("classifier") == ("-", "classifier")
    rec = record()
    layers, types, grid = viz.rank_grid(rec["rank_pattern"])
    assert layers == ["0", "1", "2"]
    assert types == TYPES  # the paper's order
    assert grid[0][0] == 3 and grid[0][1] == 2 and grid[1][4] == 6
    partial = viz.rank_grid({"m.layer.10.q": 1, "m.layer.2.q": 2, "m.layer.2.v": 3})
    assert partial[0] == ["2", "10"] and partial[2] == [[2, 3], [1, None]]  # numeric order, holes allowed


def test_plots_write_png(tmp_path):
    rec = record()
    viz.plot_rank_heatmap(rec["rank_pattern"], tmp_path / "h.png")
    viz.plot_rank_history(rec["history"], rec["layers"], rec["initial_ranks"], tmp_path / "r.png")
    viz.plot_rank_history([], rec["layers"], None, tmp_path / "empty.png")  # no rounds: still a figure
    for name in ("h.png", "r.png", "empty.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000


def test_cli_plot_run_dir(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps(record()))
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "rank_heatmap.png").read_bytes().startswith(PNG)
    assert (tmp_path / "rank_history.png").read_bytes().startswith(PNG)
    assert "rank_heatmap.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing")]) == 2


@pytest.mark.subprocess
def test_plot_imports_no_transformers_and_sets_no_offline_flags(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(record()))
    check = (
        "import os, sys\n"
        "from elalora.cli import main\n"
        f"assert main(['plot', {str(tmp_path)!r}]) == 0\n"
        "assert 'transformers' not in sys.modules\n"
        "assert not {'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'} & set(os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_plot_from_saved_adapter_dir(tmp_path):
    import torch.nn as nn

    import elalora
    from elalora.io import save_adapter

    model = nn.Sequential()
    model.add_module("layer", nn.ModuleList([nn.ModuleDict({"query": nn.Linear(6, 6), "value": nn.Linear(6, 6)})
                                             for _ in range(2)]))
    cfg = elalora.ElaLoRAConfig(r=2, target_modules=("query", "value"), total_steps=20, t_init=2, t_final=2,
                                mask_interval=2)
    elalora.inject(model, cfg)
    save_adapter(model, tmp_path / "adapter", allocator=elalora.RankAllocator(model, cfg))
    written = viz.plot_run(tmp_path)  # finds adapter/ inside the run dir
    assert [p.name for p in written] == ["rank_heatmap.png", "rank_history.png"]
    record = load_run(tmp_path / "adapter")
    assert record["rank_pattern"] == {n: 2 for n, _ in elalora.adapter_layers(model)}
    assert record["initial_ranks"] == record["rank_pattern"] and record["history"] == []


def test_run_record_round_trips_through_load_run(tmp_path):
    import torch.nn as nn

    import elalora

    model = nn.Sequential()
    model.add_module("layer", nn.ModuleList([nn.ModuleDict({"query": nn.Linear(6, 6)}) for _ in range(2)]))
    cfg = elalora.ElaLoRAConfig(r=2, target_modules=("query",), total_steps=20, t_init=2, t_final=2, mask_interval=2)
    elalora.inject(model, cfg)
    rec = run_record(elalora.RankAllocator(model, cfg), extra={"seed": 3})
    assert rec["initial_ranks"] == rec["rank_pattern"] == {"layer.0.query": 2, "layer.1.query": 2}
    (tmp_path / "elalora_run.json").write_text(json.dumps(rec))
    assert load_run(tmp_path) == rec
