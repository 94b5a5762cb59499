"""Data-parallel consistency: 2 processes, DDP over gloo on 127.0.0.1, different
data shards, several reallocation rounds; afterwards every process holds
bit-identical masks, rank patterns, adapter parameters, EMAs and optimizer state.
The same through the transformers Trainer (as ``torchrun`` launches it): the
decisions of one process with the same global batch, and checkpoints that resume;
and the orthogonality penalty counted once, as in one process.
"""
import os
import subprocess

import pytest
import torch
import torch.distributed as dist

import _reliability_util as U

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ddp_worker.py")
TRAINER_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_trainer_ddp_worker.py")
ORTH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_orth_ddp_worker.py")
WORLD = 2


def _launch(out_dir, steps: int, worker: str = WORKER):
    port = U.free_port()
    procs = [
        subprocess.Popen(
            [U.PYTHON, worker],
            env=U.worker_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=WORLD, MASTER_PORT=port, OUT_DIR=out_dir,
                             STEPS=steps, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers timed out")
    return [p.returncode for p in procs], outputs


@pytest.mark.subprocess
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_processes_stay_bit_identical(tmp_path):
    steps = 16
    codes, outputs = _launch(str(tmp_path), steps)
    if any(codes) and "Address already in use" in "".join(outputs):  # lost the free-port race once: retry
        codes, outputs = _launch(str(tmp_path), steps)
    assert not any(codes), "worker failed:\n" + "\n----\n".join(o[-3000:] for o in outputs)

    snaps = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # Not vacuous: rounds happened, ranks moved, and the shards really differed.
    assert snaps[0]["rounds"] >= 3 and snaps[0]["moved"] > 0
    assert len(set(snaps[0]["ranks"])) > 1, "ranks never left the uniform pattern"
    assert snaps[0].pop("local_loss") != snaps[1].pop("local_loss")
    assert any(k.startswith("opt.") for k in snaps[0])
    U.assert_bit_identical(snaps[0], snaps[1], "rank 0 vs rank 1")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_trainer_under_ddp_takes_one_process_decisions_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForSequenceClassification

    import _trainer_run as R

    # no dropout: the processes draw their masks from other generators than one process does
    R.hub(tmp_path / "hub", "bert", AutoModelForSequenceClassification, hidden_dropout_prob=0.0,
          attention_probs_dropout_prob=0.0)
    codes, outputs = _launch(str(tmp_path), R.STEPS, TRAINER_WORKER)
    if any(codes) and "Address already in use" in "".join(outputs):
        codes, outputs = _launch(str(tmp_path), R.STEPS, TRAINER_WORKER)
    assert not any(codes), "worker failed:\n" + "\n----\n".join(o[-3000:] for o in outputs)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    straight = runs[0]["straight"]
    assert len(straight["rounds"]) >= 3 and len({tuple(r[1:].tolist()) for r in straight["rounds"]}) > 1
    for r in range(WORLD):  # every process holds the same state; a resumed run continues exactly
        U.assert_bit_identical(runs[r]["straight"], straight, f"rank {r} vs rank 0")
        U.assert_bit_identical(runs[r]["resumed"], straight, f"rank {r} resumed vs straight")

    # One process with the same global batch (2 × 8) takes the same rounds. The values differ by the order
    # of float additions (a mean over 16 examples vs the mean of two means over 8), which Adam magnifies for
    # the near-zero gradients of slots with λ ≈ 0 (up to ~lr per step): compare what the model computes.
    model, _, callback = R.train(tmp_path / "hub", tmp_path / "single", AutoModelForSequenceClassification,
                                 "SEQ_CLS", batch_size=WORLD * 8, **R.NOT_TOKEN_AVERAGED)
    assert torch.equal(torch.tensor([[r.step, *r.ranks] for r in callback.allocator.history]), straight["rounds"])
    ddp_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "straight" / f"checkpoint-{R.STEPS}")
    ids = torch.stack([example["input_ids"] for example in R.dataset("SEQ_CLS")])
    with torch.no_grad():
        single_logits, ddp_logits = model(input_ids=ids).logits, ddp_model.eval()(input_ids=ids).logits
    torch.testing.assert_close(single_logits, ddp_logits, rtol=2e-4, atol=2e-4)


@pytest.mark.subprocess
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_trainer_under_ddp_adds_the_orthogonality_penalty_once(tmp_path):
    """The Trainer multiplies a loss normalised over the tokens of all processes by their number (DDP then
    averages); the penalty the callback adds inside that loss must come out once, as in one process."""
    pytest.importorskip("transformers")
    import _orth_cases as C

    C.hubs(tmp_path)
    codes, outputs = _launch(str(tmp_path), C.STEPS, ORTH_WORKER)
    if any(codes) and "Address already in use" in "".join(outputs):
        codes, outputs = _launch(str(tmp_path), C.STEPS, ORTH_WORKER)
    assert not any(codes), "worker failed:\n" + "\n----\n".join(o[-3000:] for o in outputs)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for case in C.CASES:
        U.assert_bit_identical(runs[1][case], runs[0][case], f"{case}: rank 1 vs rank 0")
        single = C.run(tmp_path, case, per_device=C.GLOBAL_BATCH)
        worst = max((single[k] - runs[0][case][k]).abs().max().item() for k in single)
        assert worst <= 1e-6, f"{case} (task, average_tokens_across_devices, accumulation): adapters differ by {worst}"
