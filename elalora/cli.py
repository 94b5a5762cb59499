"""``python -m elalora``: command-line entry points.

    python -m elalora plot RUN_DIR [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

# What each command imports beyond the core install, and the extra that brings it.
NEEDS = {
    "plot": (("matplotlib", "numpy"), "plot"),
}


def _missing_packages(command: str) -> list[str]:
    modules, _ = NEEDS[command]
    return [name for name in modules if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = argparse.ArgumentParser(prog="elalora", description="ElaLoRA command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)

    plot = sub.add_parser("plot", help="draw rank_heatmap.png and rank_history.png for a run directory")
    plot.add_argument("run_dir", help="a demo output dir (run.json), a Trainer output dir (elalora_run.json) "
                      "or a saved adapter dir")
    plot.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR)")

    args = parser.parse_args(argv)
    missing = _missing_packages(args.command)
    if missing:
        print(f"elalora {args.command}: needs {', '.join(missing)}, not installed here; "
              f"pip install 'elalora[{NEEDS[args.command][1]}]' brings it.", file=sys.stderr)
        return 2
    if args.command == "plot":
        from .viz import plot_run

        try:
            written = plot_run(args.run_dir, args.out)
        except FileNotFoundError as err:
            print(f"elalora plot: {err}", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}")
    return 0
