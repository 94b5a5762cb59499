"""Rank plots (matplotlib, PNG): the final rank heatmap and the rank history over rounds.

``python -m elalora plot RUN_DIR`` draws both from a run record (see
``elalora.run_records``) or from a directory saved by ``elalora.save_adapter``.
``rank_grid`` lays a rank pattern out as layers × module types, for the heatmap
and for the demo's text table. matplotlib is imported only when plotting.
"""
from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from .run_records import load_run

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")
# Order of module types in the heatmap rows (as in the paper's figures); others follow, sorted.
_TYPE_ORDER = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def split_name(name: str) -> tuple[str, str]:
    """``'bert.encoder.layer.3.attention.self.query'`` → ``('3', 'attention.self.query')``.

    The layer is the last integer component of the dotted name; the module type
    is what follows it. A name without an integer component is its own type in layer ``'-'``.
    """
    matches = list(_LAYER_INDEX.finditer(name))
    if not matches:
        return "-", name
    m = matches[-1]
    return m.group(1), name[m.end():]


def _in_type_order(types) -> list[str]:
    return [t for t in _TYPE_ORDER if t in types] + sorted(set(types) - set(_TYPE_ORDER))


def rank_grid(pattern: dict[str, int]):
    """(layers, types, grid) with ``grid[i][j]`` the rank of layer i, type j (None where absent)."""
    cells: dict[tuple[str, str], int] = {}
    for name, rank in pattern.items():
        cells[split_name(name)] = rank
    layers = sorted({lay for lay, _ in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    types = _in_type_order({typ for _, typ in cells})
    grid = [[cells.get((lay, typ)) for typ in types] for lay in layers]
    return layers, types, grid


def _short(t: str) -> str:
    return {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn.out",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }.get(t, t)


def plot_rank_heatmap(pattern: dict[str, int], path: str | Path | None = None, title: Optional[str] = None):
    """Module types (rows) × layers (columns), each cell the final rank, annotated. Returns the Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    layers, types, grid = rank_grid(pattern)
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float).T  # types × layers
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(layers), 1.0 + 0.5 * len(types)), dpi=120)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="YlGnBu", aspect="auto", origin="upper")
    ax.set_xticks(range(len(layers)), labels=layers)
    ax.set_yticks(range(len(types)), labels=[_short(t) for t in types])
    ax.set_xlabel("layer")
    finite = data[np.isfinite(data)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{int(data[i, j])}", ha="center", va="center",
                        color="white" if data[i, j] > mid else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_title(title or f"ElaLoRA final ranks (total {sum(pattern.values())})")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig


def plot_rank_history(
    history: Sequence[dict],
    layers: Sequence[str],
    initial_ranks: Optional[dict] = None,
    path: str | Path | None = None,
    title: Optional[str] = None,
):
    """Rank over optimizer steps: mean rank per module type (top) and every matrix (bottom). Returns the Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(layers)
    steps = []
    ranks = []
    if initial_ranks:
        steps.append(0)
        ranks.append([initial_ranks.get(n, np.nan) for n in layers])
    for rec in history:
        rec = rec if isinstance(rec, dict) else asdict(rec)
        if not rec.get("ranks"):
            continue
        steps.append(rec["step"])
        ranks.append(rec["ranks"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7.5), dpi=120, gridspec_kw={"height_ratios": [1, 1.4]})
    if not ranks:
        top.text(0.5, 0.5, "no reallocation rounds recorded", ha="center", va="center", transform=top.transAxes)
        bottom.set_axis_off()
    else:
        arr = np.array(ranks, dtype=float)  # [rounds, matrices]
        by_type: dict[str, list[int]] = {}
        for m, name in enumerate(layers):
            by_type.setdefault(split_name(name)[1], []).append(m)
        order = _in_type_order(by_type)
        for t in order:
            top.step(steps, arr[:, by_type[t]].mean(1), where="post", marker="o", ms=3, label=_short(t))
        top.set_ylabel("mean rank")
        top.set_xlabel("optimizer step")
        top.legend(fontsize=8, ncol=3)
        top.grid(alpha=0.3)
        sorted_ms = [m for t in order for m in sorted(by_type[t], key=lambda m: split_name(layers[m])[0].zfill(4))]
        im = bottom.imshow(arr[:, sorted_ms].T, aspect="auto", cmap="YlGnBu", interpolation="nearest")
        bottom.set_xticks(range(len(steps)), labels=[str(s) for s in steps], fontsize=7, rotation=90)
        labels = [f"{_short(split_name(layers[m])[1])}·{split_name(layers[m])[0]}" for m in sorted_ms]
        if len(labels) <= 60:
            bottom.set_yticks(range(len(labels)), labels=labels, fontsize=6)
        bottom.set_xlabel("after the round at step")
        fig.colorbar(im, ax=bottom, label="rank")
    top.set_title(title or "ElaLoRA rank history")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw ``rank_heatmap.png`` and ``rank_history.png`` for the run in ``run_dir``; returns their paths."""
    record = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    heat, hist = out / "rank_heatmap.png", out / "rank_history.png"
    plot_rank_heatmap(record["rank_pattern"], heat)
    plot_rank_history(record.get("history", []), record.get("layers") or list(record["rank_pattern"]),
                      record.get("initial_ranks"), hist)
    return [heat, hist]
