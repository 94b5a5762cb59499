"""One process of the 2-process DDP reliability test (spawned by test_reliability_ddp.py).

Environment: RANK, WORLD_SIZE, MASTER_PORT, OUT_DIR, STEPS. Trains the tiny
adapted model under DistributedDataParallel (gloo, CPU, 127.0.0.1) on this
rank's own data shard through several reallocation rounds, then saves a
snapshot of every adapter tensor, mask, EMA, optimizer state and history.
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from elalora import RankAllocator

import _reliability_util as U
from fixtures import small_config


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    steps = int(os.environ.get("STEPS", "16"))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    # The paper's start: on this toy its rounds leave the uniform pattern (the test's proof that ranks moved);
    # under init="zero_p" they prune and re-grow the same matrices. Bit-identity does not depend on the start.
    config = small_config(total_steps=steps, init="paper")
    model, _ = U.build(config, seed=0)
    # broadcast_buffers=False: every rank keeps its OWN `active` masks, so the
    # test sees any divergence instead of DDP papering over it from rank 0.
    ddp = DDP(model, broadcast_buffers=False)
    optimizer = U.make_optimizer(model)
    scheduler = U.make_scheduler(optimizer, steps)
    # The allocator is built on the unwrapped module: its layer names (and so
    # its checkpoints) are then the same with and without DDP.
    allocator = RankAllocator(ddp.module, config, optimizer)
    infos = U.train_steps(ddp, optimizer, allocator, 0, steps, shard=rank, scheduler=scheduler)
    snap = U.snapshot(model, optimizer, allocator)
    snap["rounds"] = sum(1 for i in infos if i.round is not None)
    snap["moved"] = sum(i.round.moved for i in infos if i.round is not None)
    # Gradients were averaged, yet each rank saw different data: record a local loss to prove it.
    x, y = U.batch(0, rank)
    with torch.no_grad():
        snap["local_loss"] = float(U.loss_fn(model, x, y, None))
    torch.save(snap, os.path.join(os.environ["OUT_DIR"], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
