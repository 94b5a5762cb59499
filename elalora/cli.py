"""``python -m elalora``: command-line entry points."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elalora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="fine-tune MiniLM-L6 on movie-review sentiment with ElaLoRA")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print("demo not built yet: it arrives with the real-use issue")
    return 0
