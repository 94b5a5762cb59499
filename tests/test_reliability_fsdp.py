"""FSDP2 (fully_shard): 2 processes over gloo on 127.0.0.1 train a tiny random-initialised
BERT with ElaLoRA through 4 rounds and must take the single-process run's decisions;
each holds only its shards; a checkpoint resumes exactly in fresh processes; adapters
saved from shards load into a sharded or an unsharded model.

One launch trains and checkpoints (workers in _fsdp_worker.py), a second one resumes;
the single-process reference runs in this process on the same global batches.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _reliability_util as U  # noqa: E402

pytestmark = [
    pytest.mark.subprocess,  # two worker processes
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fsdp_worker.py")
WORLD = 2
# Same math, rounded differently: FSDP sums each gradient over two half-batches, a single
# process over the whole batch. A rank created at a round starts with λ ≈ 1e-13, so the
# gradients of its P column and Q row are rounding noise that Adam (lr 0.05) turns into
# full-size steps: such ranks differ most (measured 7.3e-3), established ones by < 2e-4.
ACTIVE_SLOT_ATOL = 1e-2
DELTA_W_ATOL = 1e-3  # ΔW = s·P·diag(λ)·Q, where a young rank weighs little (measured 4.6e-4)

def _launch(out_dir, mode: str) -> None:
    for _attempt in range(2):  # a lost free-port race is retried once
        port = U.free_port()
        procs = [
            subprocess.Popen(
                [U.PYTHON, WORKER],
                env=U.worker_env(RANK=r, WORLD_SIZE=WORLD, MASTER_PORT=port, OUT_DIR=out_dir, MODE=mode,
                                 GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for r in range(WORLD)
        ]
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=150)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail(f"FSDP workers ({mode}) timed out")
        codes = [p.returncode for p in procs]
        if not (any(codes) and "Address already in use" in "".join(outputs)):
            break
    assert not any(codes), f"{mode} worker failed:\n" + "\n----\n".join(o[-3000:] for o in outputs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _launch(str(out), "run")
    _launch(str(out), "resume")

    def load(name):
        return torch.load(out / name, weights_only=True)

    return out, load


@pytest.fixture(scope="module")
def single():
    """The single-process run on the same global batches, with its allocator."""
    import _fsdp_common as C
    from elalora import RankAllocator

    torch.set_num_threads(1)
    model = C.build()
    optimizer = C.make_optimizer(model)
    scheduler = C.make_scheduler(optimizer)
    allocator = RankAllocator(model, C.config(), optimizer)
    C.train(model, optimizer, scheduler, allocator, 0, C.STEPS)
    return model, allocator


def test_sharded_run_takes_the_single_process_decisions(runs, single):
    _, load = runs
    model, allocator = single
    whole = load("whole.pt")
    import _fsdp_common as C

    decisions = C.decisions(allocator)
    assert len(decisions) == 4 and all(pruned for _, _, pruned, _, _ in decisions)
    assert len(set(decisions[-1][-1])) > 1, "ranks never left the uniform pattern"
    assert whole["decisions"] == decisions, "a round decided differently under FSDP2"
    assert whole["ranks"] == allocator.rank_pattern()
    for name, layer in zip(allocator.names, allocator.layers):
        r = layer.active_rank
        P, lam, Q = (whole[f"{name}.{attr}"] for attr in ("lora_P", "lora_lam", "lora_Q"))
        torch.testing.assert_close(P[:, :r], layer.lora_P.detach()[:, :r], rtol=0, atol=ACTIVE_SLOT_ATOL)
        torch.testing.assert_close(lam[:r], layer.lora_lam.detach()[:r], rtol=0, atol=ACTIVE_SLOT_ATOL)
        torch.testing.assert_close(Q[:r], layer.lora_Q.detach()[:r], rtol=0, atol=ACTIVE_SLOT_ATOL)
        delta_w = (P[:, :r] * (layer.scale * lam[:r])) @ Q[:r]
        torch.testing.assert_close(delta_w, layer.delta_weight().detach(), rtol=0, atol=DELTA_W_ATOL)


def test_each_process_holds_only_its_shards(runs, single):
    _, load = runs
    _, allocator = single
    sizes = [load(f"local{r}.pt")["sizes"] for r in range(WORLD)]
    whole = sizes[0]["adapter_whole"]
    assert whole == sum(p.numel() for p in allocator.params)
    assert sum(s["adapter"] for s in sizes) == whole
    for s in sizes:
        assert 0 < s["adapter"] < whole
        # EMAs: this process's shard of every tensor (each view padded to 4 elements)
        assert s["adapter"] <= s["ema"] <= s["adapter"] + 3 * len(allocator.params)
        assert s["ema"] < allocator.ema_ipt.numel()
        assert s["optimizer"] == 2 * s["adapter"]  # AdamW's exp_avg and exp_avg_sq, shards only


def test_score_table_is_the_single_process_one(runs):
    """Given the same EMAs, the one-all-reduce table differs from the single-process one only
    where P's column mean rounds differently (float64 sum rounded once, against a float32
    sum): by at most 4 float32 ulps of the score (measured: 12 of 60 scores, by ≤ 2 ulps)."""
    _, load = runs
    import _fsdp_common as C
    from elalora import RankAllocator

    whole = load("whole.pt")
    model = C.build()
    allocator = RankAllocator(model, C.config())
    for name, layer in zip(allocator.names, allocator.layers):  # the sharded run's ranks
        layer.set_active_rank(whole["ranks"][name])
    allocator.load_state_dict(whole["state"])
    expected = allocator.rank_scores()
    ulp = torch.nextafter(expected.abs(), torch.tensor(float("inf"))) - expected.abs()
    assert torch.all((whole["table"] - expected).abs() <= 4 * ulp), ((whole["table"] - expected).abs() / ulp).max()


def test_orth_penalty_and_its_gradient_match_a_single_process(runs):
    _, load = runs
    import _fsdp_common as C
    from elalora import RankAllocator

    whole = load("whole.pt")
    model = C.build()
    allocator = RankAllocator(model, C.config())
    with torch.no_grad():
        for name, layer in zip(allocator.names, allocator.layers):
            for attr in ("lora_P", "lora_lam", "lora_Q"):
                getattr(layer, attr).copy_(whole[f"{name}.{attr}"])
            layer.set_active_rank(whole["ranks"][name])
    penalty = allocator.orth_penalty()
    penalty.backward()
    torch.testing.assert_close(whole["penalty"], penalty.detach(), rtol=1e-5, atol=0)
    for name, layer in zip(allocator.names, allocator.layers):
        for attr in ("lora_P", "lora_Q"):
            torch.testing.assert_close(whole["penalty_grads"][f"{name}.{attr}"], getattr(layer, attr).grad,
                                       rtol=1e-4, atol=1e-6)


def test_sharded_run_resumes_exactly_in_fresh_processes(runs):
    _, load = runs
    for r in range(WORLD):
        uninterrupted, resumed = load(f"local{r}.pt"), load(f"resumed{r}.pt")
        uninterrupted.pop("sizes")
        assert len(uninterrupted["decisions"]) == 4  # rounds at 9 and 11 came after the resume
        U.assert_bit_identical(uninterrupted, resumed, f"process {r}: uninterrupted vs resumed")


def test_adapter_saved_from_shards_loads_sharded_and_unsharded(runs):
    out, load = runs
    import _fsdp_common as C
    import elalora

    at_resume = load("whole.pt")["at_resume"]
    model = C.build()
    elalora.load_adapter(model, out / "checkpoint" / "adapter")
    loaded_sharded = load("loaded.pt")
    for name, layer in elalora.adapter_layers(model):
        r = at_resume["ranks"][name]
        assert layer.active_rank == r
        active_slots = {"lora_P": (slice(None), slice(0, r)), "lora_lam": slice(0, r), "lora_Q": slice(0, r)}
        for attr, active in active_slots.items():
            expected = at_resume[f"{name}.{attr}"][active]
            assert torch.equal(getattr(layer, attr).detach()[active], expected)
            assert torch.equal(loaded_sharded[f"{name}.{attr}"][active], expected)
            assert torch.equal(loaded_sharded[f"{name}.{attr}"], getattr(layer, attr).detach())  # zeros beyond r


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "how, message",
    [
        ("first block only", "6 of 12 adapter parameters are FSDP2 shards"),
        ("on dim 1", r"must be sharded on dim 0 \(found \['\(Shard\(dim=0\),\)', '\(Shard\(dim=1\),\)'\]\)"),
    ],
)
def test_allocator_rejects_shardings_it_cannot_follow(one_process_group, how, message):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from elalora import RankAllocator, fsdp

    model, _ = U.build(U.small_config())
    if how == "first block only":
        fully_shard(model.b0)
    else:
        for block in (model.b0, model.b1):
            fully_shard(block, shard_placement_fn=lambda param: Shard(1) if param.dim() == 2 else None)
    before = {name: fsdp.full(t).clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        RankAllocator(model, U.small_config())
    after = {name: fsdp.full(t) for name, t in model.state_dict().items()}
    assert all(torch.equal(before[name], after[name]) for name in before)
