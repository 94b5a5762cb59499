"""One process of the exact-resume test (spawned by test_reliability_resume.py).

    python _resume_worker.py full   OUT_DIR STEPS   # uninterrupted run; checkpoint at STEPS//2
    python _resume_worker.py resume OUT_DIR STEPS   # fresh process: load the checkpoint, finish

The checkpoint holds the model's state_dict (adapters and `active` masks), the
optimizer, the LR scheduler, the allocator (step, EMAs, generator, history)
and torch's RNG (adapter dropout is on). It is loaded with weights_only=True.
"""
import os
import sys

import torch

from elalora import RankAllocator

import _reliability_util as U
from fixtures import small_config


def setup(steps: int):
    config = small_config(total_steps=steps, lora_dropout=0.1)
    model, _ = U.build(config, seed=0)
    optimizer = U.make_optimizer(model)
    scheduler = U.make_scheduler(optimizer, steps)
    allocator = RankAllocator(model, config, optimizer)
    return model, optimizer, scheduler, allocator


def main() -> None:
    mode, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    half = steps // 2
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    model, optimizer, scheduler, allocator = setup(steps)
    torch.manual_seed(99)  # the dropout stream
    if mode == "full":
        U.train_steps(model, optimizer, allocator, 0, half, scheduler=scheduler)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "allocator": allocator.state_dict(),
                "rng": torch.get_rng_state(),
            },
            ckpt_path,
        )
        start = half
    elif mode == "resume":
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        allocator.load_state_dict(ckpt["allocator"])
        torch.set_rng_state(ckpt["rng"])
        start = allocator.t
        assert start == half, (start, half)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    infos = U.train_steps(model, optimizer, allocator, start, steps, scheduler=scheduler)
    snap = U.snapshot(model, optimizer, allocator)
    snap["rounds_after_resume"] = sum(1 for i in infos if i.round is not None and i.round.moved > 0)
    snap["lr"] = optimizer.param_groups[0]["lr"]
    torch.save(snap, os.path.join(out_dir, f"{mode}.pt"))


if __name__ == "__main__":
    main()
