"""The 2-process FSDP2 runs of test_reliability_fsdp.py and their single-process reference.

``python _fsdp_worker.py MODE`` with OUT_DIR and MASTER_PORT in the environment.
The launcher imports torch and transformers once, then forks the two processes
(each a fresh gloo rank: nothing has run before the fork) and waits for them;
what needs a single process it then computes itself, so the test only compares.

MODE=run: each process trains the tiny BERT sharded with fully_shard (per layer,
then the root) from step 0 to STEPS; at RESUME_AT it writes a checkpoint (model
and optimizer through torch.distributed.checkpoint, allocator and LR scheduler
state from the first process) and save_adapter; at the end it records its
shards and their sizes (local{rank}.pt) and the first one the gathered adapters,
allocator state, score table and orthogonality penalty (whole.pt). Then the
launcher runs the single-process reference on the same global batches and
recomputes the score table and the penalty from the gathered values (single.pt).

MODE=resume: fresh processes load that checkpoint, train RESUME_AT..STEPS and
record their shards (resumed{rank}.pt), then load_adapter the checkpoint's
adapter into the sharded model and gather it (loaded.pt); the launcher loads the
same adapter into an unsharded model (loaded_unsharded.pt).
"""
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import _fsdp_common as C
import elalora
from elalora import RankAllocator, fsdp

WORLD = 2
SLOT_PARAMS = ("lora_P", "lora_lam", "lora_Q")


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
    """This process's shards of everything a round touches, bit for bit."""
    out = {"ema_ipt": allocator.ema_ipt.clone(), "ema_unc": allocator.ema_unc.clone(), "t": allocator.t,
           "generator": allocator.generator.get_state(), "decisions": C.decisions(allocator)}
    for name, layer in zip(allocator.names, allocator.layers):
        for attr in SLOT_PARAMS:
            param = getattr(layer, attr)
            out[f"{name}.{attr}"] = fsdp.local(param).clone()
            for key, value in optimizer.state[param].items():
                out[f"{name}.{attr}.{key}"] = fsdp.local(value).clone()
        out[f"{name}.active"] = layer.active.clone()
    return out


def adapters(model) -> dict:
    """Every adapter tensor, whole (collectives when sharded: every process calls it)."""
    return {f"{name}.{attr}": fsdp.full(getattr(layer, attr)).detach().clone()
            for name, layer in elalora.adapter_layers(model) for attr in SLOT_PARAMS}


def penalty_grads(allocator, whole) -> dict:
    """The gradients of P and Q (λ gets none from the penalty), made whole by ``whole``."""
    return {f"{name}.{attr}": whole(getattr(layer, attr).grad)
            for name, layer in zip(allocator.names, allocator.layers) for attr in ("lora_P", "lora_Q")}


def whole_record(model, allocator) -> dict:
    return {"decisions": C.decisions(allocator), "ranks": allocator.rank_pattern(), **adapters(model)}


def run(rank: int, out_dir: str) -> None:
    model, optimizer, scheduler, allocator = sharded_setup()
    C.train(model, optimizer, scheduler, allocator, 0, C.RESUME_AT, rank, WORLD)
    at_resume = whole_record(model, allocator)
    save_checkpoint(os.path.join(out_dir, "checkpoint"), model, optimizer, scheduler, allocator)
    C.train(model, optimizer, scheduler, allocator, C.RESUME_AT, C.STEPS, rank, WORLD)
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
    whole["at_resume"] = at_resume
    whole["state"] = allocator.state_dict()
    whole["table"] = allocator.rank_scores()
    optimizer.zero_grad(set_to_none=True)
    penalty = allocator.orth_penalty()
    penalty.backward()
    whole["penalty"] = penalty.detach()
    whole["penalty_grads"] = penalty_grads(allocator, fsdp.full)
    if rank == 0:
        torch.save(whole, os.path.join(out_dir, "whole.pt"))


def resume(rank: int, out_dir: str) -> None:
    model, optimizer, scheduler, allocator = sharded_setup()
    checkpoint = os.path.join(out_dir, "checkpoint")
    load_checkpoint(checkpoint, model, optimizer, scheduler, allocator)
    C.train(model, optimizer, scheduler, allocator, C.RESUME_AT, C.STEPS, rank, WORLD)
    torch.save(local_record(optimizer, allocator), os.path.join(out_dir, f"resumed{rank}.pt"))
    elalora.load_adapter(model, os.path.join(checkpoint, "adapter"))
    loaded = whole_record(model, allocator)
    if rank == 0:
        torch.save(loaded, os.path.join(out_dir, "loaded.pt"))


def single_process_reference(out_dir: str) -> None:
    """The same training in one process, and the table and penalty recomputed from the sharded run's values."""
    model = C.build()
    optimizer = C.make_optimizer(model)
    allocator = RankAllocator(model, C.config(), optimizer)
    C.train(model, optimizer, C.make_scheduler(optimizer), allocator, 0, C.STEPS)
    single = {"decisions": C.decisions(allocator), "ranks": allocator.rank_pattern(), **adapters(model),
              "delta_w": {name: layer.delta_weight().detach() for name, layer in elalora.adapter_layers(model)}}

    whole = torch.load(os.path.join(out_dir, "whole.pt"), weights_only=True)
    model = C.build()
    allocator = RankAllocator(model, C.config())
    with torch.no_grad():
        for name, layer in zip(allocator.names, allocator.layers):
            for attr in SLOT_PARAMS:
                getattr(layer, attr).copy_(whole[f"{name}.{attr}"])
            layer.set_active_rank(whole["ranks"][name])
    allocator.load_state_dict(whole["state"])
    single["table_from_sharded_emas"] = allocator.rank_scores()
    single["delta_w_of_sharded"] = {name: layer.delta_weight().detach()
                                    for name, layer in zip(allocator.names, allocator.layers)}
    penalty = allocator.orth_penalty()
    penalty.backward()
    single["penalty_from_sharded_adapters"] = penalty.detach()
    single["penalty_grads"] = penalty_grads(allocator, lambda grad: grad)
    torch.save(single, os.path.join(out_dir, "single.pt"))


def process(rank: int, mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    (run if mode == "run" else resume)(rank, out_dir)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    mode, out_dir = sys.argv[1], os.environ["OUT_DIR"]
    pids = []
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                process(rank, mode, out_dir)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    if any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids):
        sys.exit(f"a {mode} process failed")
    torch.set_num_threads(1)
    if mode == "run":
        single_process_reference(out_dir)
    else:
        model = C.build()
        elalora.load_adapter(model, os.path.join(out_dir, "checkpoint", "adapter"))
        torch.save(adapters(model), os.path.join(out_dir, "loaded_unsharded.pt"))


if __name__ == "__main__":
    main()
