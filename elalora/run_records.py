"""Run records: what a run did to the ranks, as JSON-able data (plotted by ``elalora.viz``).

A *run record* is the dict ``run_record(allocator)`` returns (the demo writes it
as ``run.json``; the Trainer callback as ``elalora_run.json``)::

    {"layers": [names], "initial_ranks": {name: r}, "rank_pattern": {name: r},
     "history": [{"step", "budget", "pruned", "expanded", "passed_over", "ranks"}, ...], ...}

``load_run`` reads one back, or rebuilds one from a directory saved by
``elalora.save_adapter`` (with its allocator state, for the history).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .allocator_files import STATE_JSON, has_allocator_state
from .io import CONFIG_NAME, is_saved_adapter, read_adapter_config

RUN_RECORD_NAMES = ("run.json", "elalora_run.json")  # the demo's, the Trainer callback's


def run_record(allocator, initial_ranks: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """A JSON-able record of an allocator's run: layer names, ranks, round history (+ ``extra``)."""
    record = {
        "layers": list(allocator.names),
        "initial_ranks": dict(initial_ranks) if initial_ranks else {n: allocator.config.r for n in allocator.names},
        "rank_pattern": allocator.rank_pattern(),
        "total_rank": allocator.total_rank(),
        "steps_done": allocator.t,
        "config": allocator.config.to_dict(),
        "history": [asdict(r) for r in allocator.history],
    }
    if extra:
        record.update(extra)
    return record


def load_run(run_dir: str | Path) -> dict:
    """A run record from ``run.json`` / ``elalora_run.json``, or from a saved adapter directory (or its ``adapter/``)."""
    run_dir = Path(run_dir)
    for name in RUN_RECORD_NAMES:
        if (run_dir / name).is_file():
            with open(run_dir / name, encoding="utf-8") as f:
                return json.load(f)
    if is_saved_adapter(run_dir):
        return _record_of_saved_adapter(run_dir)
    if (run_dir / "adapter").is_dir():
        return load_run(run_dir / "adapter")
    raise FileNotFoundError(f"no run record ({', '.join(RUN_RECORD_NAMES)}) or {CONFIG_NAME} in {run_dir}")


def _record_of_saved_adapter(directory: Path) -> dict:
    layers = read_adapter_config(directory)["layers"]
    pattern = {name: info["rank"] for name, info in layers.items()}
    record = {"layers": list(pattern), "rank_pattern": pattern, "history": []}
    initial = {name: info.get("r_init") for name, info in layers.items()}
    if initial and all(isinstance(r, int) for r in initial.values()):
        record["initial_ranks"] = initial
    if has_allocator_state(directory):
        with open(directory / STATE_JSON, encoding="utf-8") as f:
            record["history"] = json.load(f).get("history", [])
    return record
