"""One process of the 2-process FSDP2 tests (spawned by test_reliability_fsdp.py).

Environment: RANK, WORLD_SIZE, MASTER_PORT, OUT_DIR, MODE.

MODE=run: train the tiny BERT sharded with fully_shard (per layer, then the
root) from step 0 to STEPS; at RESUME_AT write a checkpoint (model and
optimizer through torch.distributed.checkpoint, allocator and LR scheduler
state from the first process) and save_adapter; at the end record this
process's shards and sizes (local{rank}.pt) and, on the first process, the
gathered adapters, the score table and the orthogonality penalty (whole.pt).

MODE=resume: fresh processes load that checkpoint, train RESUME_AT..STEPS and
record local{rank}.pt again (resumed{rank}.pt); then load_adapter of the saved
adapter into the sharded model and record the gathered result (loaded.pt).
"""
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import _fsdp_common as C  # noqa: E402
import elalora  # noqa: E402
from elalora import RankAllocator, fsdp  # noqa: E402


def sharded_setup():
    model = C.build()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    optimizer = C.make_optimizer(model)
    scheduler = C.make_scheduler(optimizer)
    allocator = RankAllocator(model, C.config(), optimizer)
    return model, optimizer, scheduler, allocator


def save_checkpoint(directory, model, optimizer, scheduler, allocator) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"))
    state = allocator.state_dict()  # a collective: every process calls it
    if dist.get_rank() == 0:
        torch.save({"allocator": state, "scheduler": scheduler.state_dict()}, os.path.join(directory, "rest.pt"))
    elalora.save_adapter(model, os.path.join(directory, "adapter"), allocator=allocator)
    dist.barrier()


def load_checkpoint(directory, model, optimizer, scheduler, allocator) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rest = torch.load(os.path.join(directory, "rest.pt"), weights_only=True)
    scheduler.load_state_dict(rest["scheduler"])
    allocator.load_state_dict(rest["allocator"])


def local_record(optimizer, allocator) -> dict:
    """This process's shards of everything a round touches, bit for bit, and their sizes."""
    out = {"ema_ipt": allocator.ema_ipt.clone(), "ema_unc": allocator.ema_unc.clone(), "t": allocator.t,
           "generator": allocator.generator.get_state(), "decisions": C.decisions(allocator)}
    for name, layer in zip(allocator.names, allocator.layers):
        for attr in ("lora_P", "lora_lam", "lora_Q"):
            param = getattr(layer, attr)
            out[f"{name}.{attr}"] = fsdp.local(param).clone()
            for key, value in optimizer.state[param].items():
                out[f"{name}.{attr}.{key}"] = fsdp.local(value).clone()
        out[f"{name}.active"] = layer.active.clone()
    return out


def whole_record(model, allocator) -> dict:
    """Gathered adapters (collectives: every process calls it)."""
    out = {"decisions": C.decisions(allocator), "ranks": allocator.rank_pattern()}
    for name, layer in elalora.adapter_layers(model):
        for attr in ("lora_P", "lora_lam", "lora_Q"):
            out[f"{name}.{attr}"] = fsdp.full(getattr(layer, attr)).detach().clone()
    return out


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out_dir, mode = os.environ["OUT_DIR"], os.environ["MODE"]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    model, optimizer, scheduler, allocator = sharded_setup()
    checkpoint = os.path.join(out_dir, "checkpoint")
    if mode == "run":
        C.train(model, optimizer, scheduler, allocator, 0, C.RESUME_AT, rank, world)
        whole_at_resume = whole_record(model, allocator)
        save_checkpoint(checkpoint, model, optimizer, scheduler, allocator)
        C.train(model, optimizer, scheduler, allocator, C.RESUME_AT, C.STEPS, rank, world)
        record = local_record(optimizer, allocator)
        record["sizes"] = {
            "adapter": sum(fsdp.local(p).numel() for p in allocator.params),
            "adapter_whole": sum(p.numel() for p in allocator.params),
            "ema": allocator.ema_ipt.numel(),
            "optimizer": sum(fsdp.local(v).numel() for p in allocator.params
                             for v in optimizer.state[p].values() if v.dim()),
        }
        torch.save(record, os.path.join(out_dir, f"local{rank}.pt"))
        whole = whole_record(model, allocator)
        whole["at_resume"] = whole_at_resume
        whole["state"] = allocator.state_dict()
        whole["table"] = allocator.rank_scores()
        penalty = allocator.orth_penalty()
        optimizer.zero_grad(set_to_none=True)
        penalty.backward()
        whole["penalty"] = penalty.detach()
        whole["penalty_grads"] = {
            f"{name}.{attr}": fsdp.full(getattr(layer, attr).grad)
            for name, layer in zip(allocator.names, allocator.layers) for attr in ("lora_P", "lora_Q")
        }
        if rank == 0:
            torch.save(whole, os.path.join(out_dir, "whole.pt"))
    else:
        load_checkpoint(checkpoint, model, optimizer, scheduler, allocator)
        C.train(model, optimizer, scheduler, allocator, C.RESUME_AT, C.STEPS, rank, world)
        torch.save(local_record(optimizer, allocator), os.path.join(out_dir, f"resumed{rank}.pt"))
        elalora.load_adapter(model, os.path.join(checkpoint, "adapter"))
        loaded = whole_record(model, allocator)
        if rank == 0:
            torch.save(loaded, os.path.join(out_dir, "loaded.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
