"""FSDP2 (fully_shard): 2 processes over gloo on 127.0.0.1 train a tiny random-initialised
BERT with ElaLoRA through 4 rounds and must take the single-process run's decisions;
each holds only its shards; a checkpoint resumes exactly in fresh processes; adapters
saved from shards load into a sharded or an unsharded model.

_fsdp_worker.py runs the processes (one launch trains and checkpoints, a second one
resumes) and the single-process reference on the same global batches; these tests
compare what they saved.
"""
import os
import subprocess

import pytest
import torch
import torch.distributed as dist

import _reliability_util as U

pytestmark = [
    pytest.mark.subprocess,  # two worker processes
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fsdp_worker.py")
WORLD = 2
SLOT_PARAMS = ("lora_P", "lora_lam", "lora_Q")
# Same math, rounded differently: FSDP sums each gradient over two half-batches, a single
# process over the whole batch. A rank created at a round starts with λ ≈ 1e-13, so the
# gradients of its P column and Q row are rounding noise that Adam (lr 0.05) turns into
# full-size steps: such ranks differ most (measured 7.3e-3), established ones by < 2e-4.
ACTIVE_SLOT_ATOL = 1e-2
DELTA_W_ATOL = 1e-3  # ΔW = s·P·diag(λ)·Q, where a young rank weighs little (measured 4.6e-4)


def _launch(out_dir, mode: str) -> None:
    for _attempt in range(2):  # a lost free-port race is retried once
        env = U.worker_env(MASTER_PORT=U.free_port(), OUT_DIR=out_dir, GLOO_SOCKET_IFNAME="lo")
        try:
            done = subprocess.run([U.PYTHON, WORKER, mode], env=env, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"FSDP {mode} processes timed out")
        output = done.stdout + done.stderr
        if not (done.returncode and "Address already in use" in output):
            break
    assert done.returncode == 0, f"FSDP {mode} failed:\n{output[-6000:]}"


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _launch(str(out), "run")
    _launch(str(out), "resume")
    return lambda name: torch.load(out / name, weights_only=True)


def test_sharded_run_takes_the_single_process_decisions(load):
    whole, single = load("whole.pt"), load("single.pt")
    decisions = single["decisions"]
    assert len(decisions) == 4 and all(pruned for _, _, pruned, _, _ in decisions)
    assert len(set(decisions[-1][-1])) > 1, "ranks never left the uniform pattern"
    assert whole["decisions"] == decisions, "a round decided differently under FSDP2"
    assert whole["ranks"] == single["ranks"]
    for name, r in single["ranks"].items():
        P, lam, Q = (whole[f"{name}.{attr}"] for attr in SLOT_PARAMS)
        P1, lam1, Q1 = (single[f"{name}.{attr}"] for attr in SLOT_PARAMS)
        torch.testing.assert_close(P[:, :r], P1[:, :r], rtol=0, atol=ACTIVE_SLOT_ATOL)
        torch.testing.assert_close(lam[:r], lam1[:r], rtol=0, atol=ACTIVE_SLOT_ATOL)
        torch.testing.assert_close(Q[:r], Q1[:r], rtol=0, atol=ACTIVE_SLOT_ATOL)
        delta_w, delta_w1 = single["delta_w_of_sharded"][name], single["delta_w"][name]
        torch.testing.assert_close(delta_w, delta_w1, rtol=0, atol=DELTA_W_ATOL)


def test_each_process_holds_only_its_shards(load):
    sizes = [load(f"local{r}.pt")["sizes"] for r in range(WORLD)]
    whole = sizes[0]["adapter_whole"]
    assert whole == sum(t.numel() for key, t in load("single.pt").items() if key.endswith(SLOT_PARAMS))
    assert sum(s["adapter"] for s in sizes) == whole
    for s in sizes:
        assert 0 < s["adapter"] < whole
        # EMAs: this process's shard of each of the 36 tensors, each view padded to 4 elements
        assert s["adapter"] <= s["ema"] <= s["adapter"] + 3 * 36
        assert s["optimizer"] == 2 * s["adapter"]  # AdamW's exp_avg and exp_avg_sq, shards only


def test_score_table_is_the_single_process_one(load):
    """Given the same EMAs, the one-all-reduce table differs from the single-process one only
    where P's column mean rounds differently (float64 sum rounded once, against a float32
    sum): by at most 4 float32 ulps of the score (measured: 12 of 60 scores, by ≤ 2 ulps)."""
    sharded, expected = load("whole.pt")["table"], load("single.pt")["table_from_sharded_emas"]
    ulp = torch.nextafter(expected.abs(), torch.tensor(float("inf"))) - expected.abs()
    assert torch.all((sharded - expected).abs() <= 4 * ulp), ((sharded - expected).abs() / ulp).max()


def test_orth_penalty_and_its_gradient_match_a_single_process(load):
    whole, single = load("whole.pt"), load("single.pt")
    torch.testing.assert_close(whole["penalty"], single["penalty_from_sharded_adapters"], rtol=1e-5, atol=0)
    assert whole["penalty_grads"].keys() == single["penalty_grads"].keys()
    for key, grad in single["penalty_grads"].items():
        torch.testing.assert_close(whole["penalty_grads"][key], grad, rtol=1e-4, atol=1e-6)


def test_sharded_run_resumes_exactly_in_fresh_processes(load):
    for r in range(WORLD):
        uninterrupted, resumed = load(f"local{r}.pt"), load(f"resumed{r}.pt")
        uninterrupted.pop("sizes")
        assert [d[0] for d in uninterrupted["decisions"]] == [5, 7, 9, 11]  # 9 and 11 came after the resume
        U.assert_bit_identical(uninterrupted, resumed, f"process {r}: uninterrupted vs resumed")


def test_adapter_saved_from_shards_loads_sharded_and_unsharded(load):
    at_resume = load("whole.pt")["at_resume"]
    sharded, unsharded = load("loaded.pt"), load("loaded_unsharded.pt")
    assert sharded["ranks"] == at_resume["ranks"]
    for name in at_resume["ranks"]:
        for attr in SLOT_PARAMS:
            key = f"{name}.{attr}"
            assert torch.equal(sharded[key], at_resume[key])  # every slot is saved, inactive ones too
            assert torch.equal(sharded[key], unsharded[key])


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


def test_orth_penalty_rejects_adapters_left_unsharded_by_the_root(one_process_group):
    from torch.distributed.fsdp import fully_shard

    from elalora import RankAllocator

    model, _ = U.build(U.small_config())
    fully_shard(model.b0)
    fully_shard(model)  # the root keeps b1's adapters unsharded after its forward
    allocator = RankAllocator(model, U.small_config())
    model(torch.randn(4, U.IN))
    with pytest.raises(RuntimeError, match="2 of 4 adapters are sharded right now"):
        allocator.orth_penalty()


def test_allocator_built_before_fully_shard_fails_at_its_first_round(one_process_group):
    from torch.distributed.fsdp import fully_shard

    from elalora import RankAllocator

    model, _ = U.build(U.small_config())
    allocator = RankAllocator(model, U.small_config())
    for block in (model.b0, model.b1, model):
        fully_shard(block)  # replaces every parameter by a sharded one
    with pytest.raises(RuntimeError, match="build the optimizer and the allocator after fully_shard"):
        for _ in range(U.small_config().total_steps):
            allocator.step()
    assert allocator.history == []
