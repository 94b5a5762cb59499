"""Save and load time of a 7B-class adapter set (~160 MB), with and without the data digests.

The adapters of a Llama-7B shape (32 blocks; q, k, v, o 4096×4096; gate, up 4096→11008; down 11008→4096),
r = 8, r_max = 16, float32: 160 MB of slots. The base weights are a zero-memory stand-in (one stride-0 view):
only the adapter files are written. "without" replaces the digest by a constant, so the same code path runs
minus the hashing. Save and load alternate with and without, pass by pass. On a shared machine the wall
time swings with the other processes' disk and CPU use, so the process's CPU time (all its threads) is
printed too: medians of both, and the fastest wall time; and the speed of the digest alone.

    .venv/bin/python benchmarks/bench_save_digest.py [--passes 5] [--dir /tmp/elalora-digest-bench]
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

import elalora
from elalora import _files, io

BLOCKS, HIDDEN, MLP = 32, 4096, 11008
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}


def stand_in_model() -> nn.Module:
    """Blocks of linear layers of Llama-7B's shapes whose weights take no memory."""
    zero = torch.zeros(())
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(BLOCKS):
        block = nn.Module()
        for name, (fan_in, fan_out) in SHAPES.items():
            linear = nn.Linear(1, 1, bias=False)
            linear.weight = nn.Parameter(zero.expand(fan_out, fan_in), requires_grad=False)
            setattr(block, name, linear)
        model.layers.append(block)
    return model


def adapted(seed: int) -> nn.Module:
    config = elalora.ElaLoRAConfig(r=8, r_max=16, target_modules=tuple(SHAPES), seed=seed, init="paper")
    return elalora.inject(stand_in_model(), config)


@contextlib.contextmanager
def no_digest():
    """The digest replaced by a constant wherever it is computed: the same code path, minus the hashing."""
    with mock.patch.object(_files, "tensors_digest", lambda tensors: "-"), \
            mock.patch.object(io, "tensors_digest", lambda tensors: "-"):
        yield


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/elalora-digest-bench"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, target = adapted(0), adapted(1)
    size = sum(p.numel() * p.element_size() for _, l in elalora.adapter_layers(model)
               for p in l.slot_params())
    times = {(kind, op): [] for kind in ("with", "without") for op in ("save", "load")}
    for _ in range(args.passes):
        for kind in ("with", "without"):
            directory = args.dir / kind
            shutil.rmtree(directory, ignore_errors=True)
            with no_digest() if kind == "without" else contextlib.nullcontext():
                times[kind, "save"].append(timed(lambda: elalora.save_adapter(model, directory)))
                times[kind, "load"].append(timed(lambda: elalora.load_adapter(target, directory)))
    slots = {f"{n}.{k}": getattr(l, k).detach() for n, l in elalora.adapter_layers(model) for k, _ in l.SLOTS}
    hashing = statistics.median(timed(lambda: _files.tensors_digest(slots))[1] for _ in range(args.passes))
    on_disk = sum(p.stat().st_size for p in (args.dir / "with").iterdir())
    print(f"slots {size / 1e6:.1f} MB, files on disk {on_disk / 1e6:.1f} MB, {args.passes} passes, "
          f"torch threads {torch.get_num_threads()}; the digest alone: {size / 1e6 / hashing:.0f} MB/s (CPU median)")
    for op in ("save", "load"):
        for what, pick in (("CPU median", lambda ts: statistics.median(c for _, c in ts)),
                           ("wall median", lambda ts: statistics.median(w for w, _ in ts)),
                           ("wall fastest", lambda ts: min(w for w, _ in ts))):
            with_, without = pick(times["with", op]), pick(times["without", op])
            print(f"{op} {what}: {with_:.2f} s with the digest, {without:.2f} s without "
                  f"(+{with_ - without:.2f} s, {100 * (with_ / without - 1):+.0f}%)")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
