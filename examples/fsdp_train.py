"""ElaLoRA under FSDP2: shard an adapted transformer with ``fully_shard``, train, checkpoint, resume.

    torchrun --nproc_per_node 2 examples/fsdp_train.py --checkpoint /tmp/elalora_fsdp

runs on CPU (gloo) as written and on GPUs (nccl, one per process). A small BERT is
initialised at random (no download) and the data is synthetic: the point is the
recipe. Run it again with the same ``--checkpoint`` and it resumes from the last
complete checkpoint (``DIR/step_<t>``, whose ``allocator.pt`` is written last).

The recipe, in order: inject the adapters into the whole model; ``fully_shard`` each
transformer block, then the root; build the optimizer and the ``RankAllocator`` on the
sharded model; add ``allocator.orth_penalty()`` to the loss and call
``allocator.step()`` after ``optimizer.step()`` on every process. Checkpoints: model and
optimizer through ``torch.distributed.checkpoint``; ``allocator.state_dict()`` (called
on every process, it gathers the EMAs) and ``save_adapter`` are written by the first.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig, BertForSequenceClassification

import elalora


def build_model(config: elalora.ElaLoRAConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # every process builds the same model before it is sharded
    bert = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(bert).to(device)
    elalora.inject(model, config)
    for block in model.bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)
    return model


def last_checkpoint(root: str):
    """The complete checkpoint of the latest step under ``root`` (None if there is none)."""
    steps = [int(d.removeprefix("step_")) for d in os.listdir(root) if d.startswith("step_")]
    complete = [t for t in steps if os.path.exists(os.path.join(root, f"step_{t}", "allocator.pt"))]
    return os.path.join(root, f"step_{max(complete)}") if complete else None


def batch(step: int, rank: int, world: int, size: int = 16):
    """This process's share of a synthetic global batch: label = is token 7 in the sequence."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 1000, (size, 32), generator=g)
    ids[: size // 2, 5] = 7
    labels = (ids == 7).any(dim=1).long()
    part = size // world
    return ids[rank * part : (rank + 1) * part], labels[rank * part : (rank + 1) * part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps this run trains (total: --total-steps)")
    parser.add_argument("--total-steps", type=int, default=120)
    parser.add_argument("--checkpoint", required=True, help="directory to resume from and save to")
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.checkpoint, exist_ok=True)

    config = elalora.ElaLoRAConfig(
        r=4, target_modules=("query", "value", "intermediate.dense"), t_init=20, t_final=20,
        mask_interval=10, total_steps=args.total_steps, orth_reg=0.1,
    )
    model = build_model(config, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    allocator = elalora.RankAllocator(model, config, optimizer)  # on the sharded model

    latest = last_checkpoint(args.checkpoint)
    if latest is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(latest, "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        allocator.load_state_dict(torch.load(os.path.join(latest, "allocator.pt"), weights_only=True))
        if rank == 0:
            print(f"resumed from {latest}")

    stop = min(allocator.t + args.steps, args.total_steps)
    for step in range(allocator.t, stop):
        ids, labels = (t.to(device) for t in batch(step, rank, world))
        loss = F.cross_entropy(model(input_ids=ids).logits, labels) + allocator.orth_penalty()
        loss.backward()
        optimizer.step()
        info = allocator.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and info.round is not None:
            print(f"step {step}: loss {loss.item():.3f}, round moved {info.round.moved} ranks -> {info.round.ranks}")

    directory = os.path.join(args.checkpoint, f"step_{allocator.t}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"))
    elalora.save_adapter(model, os.path.join(directory, "adapter"), allocator=allocator)  # every process
    allocator_state = allocator.state_dict()  # every process: it gathers the EMAs
    dist.barrier()  # everything else is on disk before allocator.pt marks the checkpoint complete
    if rank == 0:
        torch.save(allocator_state, os.path.join(directory, "allocator.pt"))
        print(f"step {allocator.t}: rank pattern {list(allocator.rank_pattern().values())}; saved to {directory}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
