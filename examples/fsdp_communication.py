"""What ElaLoRA itself sends between FSDP2 processes, per step and per round.

    torchrun --nproc_per_node 2 examples/fsdp_communication.py

A random-initialised BERT of MiniLM-L6's shape (6 layers, hidden 384, 36 adapted
matrices, r = 8, r_max = 16) trains 8 steps with rounds at steps 4 and 6 on CPU
(gloo). The collectives of ``elalora.fsdp`` are counted (bytes this process sends
into each); FSDP2's own all-gathers and reduce-scatters are not, and happen anyway.
"""
import collections

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig, BertForSequenceClassification

import elalora
import elalora.fsdp

sent = collections.Counter()
phase = "step"


class _Counting:
    """Stands in for torch.distributed inside elalora.fsdp, counting what goes out."""

    def __getattr__(self, name):
        collective = getattr(dist, name)
        if name not in ("all_gather", "all_reduce"):
            return collective

        def counted(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            sent[phase, name] += tensor.numel() * tensor.element_size()
            sent[phase, name + " calls"] += 1
            return collective(*args, **kwargs)

        return counted


def main() -> None:
    global phase
    elalora.fsdp.dist = _Counting()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    bert = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2)
    model = BertForSequenceClassification(bert)
    config = elalora.ElaLoRAConfig(
        r=8, target_modules=("query", "key", "value", "output.dense", "intermediate.dense"), b=4,
        t_init=2, t_final=2, mask_interval=2, total_steps=10, rank_scheduler=False,
    )
    elalora.inject(model, config)
    for block in model.bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = elalora.RankAllocator(model, config, optimizer)

    steps = 8
    for step in range(steps):
        ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(step))
        phase = "step"
        loss = F.cross_entropy(model(input_ids=ids).logits, ids[:, 0] % 2) + allocator.orth_penalty()
        loss.backward()
        optimizer.step()
        phase = "round"  # a step without a round sends nothing here
        allocator.step()
        optimizer.zero_grad(set_to_none=True)
    phase = "state_dict"
    allocator.state_dict()

    if rank == 0:
        rounds = len(allocator.history)
        adapter = sum(p.numel() for p in allocator.params)
        print(f"{world} processes, {len(allocator.layers)} matrices, {adapter} adapter elements "
              f"({adapter * 4 / 1e6:.2f} MB float32), {steps} steps, {rounds} rounds; bytes each process sends:")
        print(f"  per step, orth_penalty all-gather: {sent['step', 'all_gather'] / steps:,.0f} "
              f"({sent['step', 'all_gather calls'] / steps:g} call)")
        print(f"  per round, score-table all-reduce: {sent['round', 'all_reduce'] / rounds:,.0f} "
              f"({sent['round', 'all_reduce calls'] / rounds:g} call)")
        print(f"  per round, slot-edit all-gather:   {sent['round', 'all_gather'] / rounds:,.0f} "
              f"({sent['round', 'all_gather calls'] / rounds:g} call; layers touched per round: "
              f"{[len(set(r.pruned) | set(r.expanded)) for r in allocator.history]})")
        print(f"  allocator.state_dict() all-gather: {sent['state_dict', 'all_gather']:,.0f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
