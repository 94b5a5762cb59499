"""Exact resume: a run checkpointed at N/2 and resumed in a fresh process ends
bit-identical to the uninterrupted run, including the rounds after the resume;
and RankAllocator.load_state_dict rejects a state from another model or config.
"""
import os
import subprocess

import pytest
import torch

from elalora import RankAllocator

import _reliability_util as U
from fixtures import small_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_resume_worker.py")


def _run(mode: str, out_dir, steps: int) -> None:
    proc = subprocess.run([U.PYTHON, WORKER, mode, str(out_dir), str(steps)], env=U.worker_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{mode} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.subprocess
def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    steps = 16
    _run("full", tmp_path, steps)
    _run("resume", tmp_path, steps)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert full["rounds_after_resume"] >= 2, "no reallocation round happened after the checkpoint"
    assert full["t"] == steps
    U.assert_bit_identical(full, resumed, "uninterrupted vs resumed")


# ------------------------------------------------------------ rejections
def _allocator(config=None, model_config=None):
    config = config or small_config()
    model, _ = U.build(model_config or config)
    return RankAllocator(model, config, U.make_optimizer(model))


def test_load_state_dict_rejects_other_model():
    state = _allocator().state_dict()
    other_cfg = small_config(target_modules=("query",))
    other = _allocator(other_cfg)
    with pytest.raises(ValueError, match="different model"):
        other.load_state_dict(state)


def test_load_state_dict_rejects_other_config():
    state = _allocator().state_dict()
    other = _allocator(small_config(beta1=0.9))
    with pytest.raises(ValueError, match="config differs.*beta1"):
        other.load_state_dict(state)


def test_load_state_dict_rejects_other_total_steps():
    state = _allocator().state_dict()
    other = _allocator(small_config(total_steps=40))
    with pytest.raises(ValueError, match="total_steps"):
        other.load_state_dict(state)


def test_load_state_dict_rejects_garbage():
    alloc = _allocator()
    with pytest.raises(ValueError, match="version"):
        alloc.load_state_dict({"t": 3})
    with pytest.raises(ValueError, match="version"):
        alloc.load_state_dict([1, 2])


def test_load_state_dict_rejects_bad_ema():
    alloc = _allocator()
    state = alloc.state_dict()
    state["ema_ipt"] = state["ema_ipt"][:-1]
    with pytest.raises(ValueError, match="ema_ipt must be float32 of shape"):
        alloc.load_state_dict(state)
    state = alloc.state_dict()
    state["ema_unc"] = state["ema_unc"].double()
    with pytest.raises(ValueError, match="ema_unc must be float32"):
        alloc.load_state_dict(state)


def test_rejected_load_leaves_allocator_untouched():
    alloc = _allocator()
    model_t = alloc.t
    before = alloc.ema_ipt.clone()
    state = alloc.state_dict()
    state["ema_ipt"] = torch.ones_like(state["ema_ipt"])
    state["config"]["k"] = 5
    with pytest.raises(ValueError):
        alloc.load_state_dict(state)
    assert torch.equal(alloc.ema_ipt, before) and alloc.t == model_t


def test_load_state_dict_rejects_model_with_other_ranks():
    """Loading the allocator into a model whose masks were not restored would
    silently pair EMAs with the wrong slots: it must be refused."""
    config = small_config()
    model, _ = U.build(config)
    opt = U.make_optimizer(model)
    alloc = RankAllocator(model, config, opt)
    U.train_steps(model, opt, alloc, 0, 8)
    assert len(set(alloc.rank_pattern().values())) > 1
    state = alloc.state_dict()
    fresh = _allocator(config)  # uniform ranks: the model state was not loaded
    with pytest.raises(ValueError, match="active ranks"):
        fresh.load_state_dict(state)
    # With the model state loaded first it is accepted.
    model2, _ = U.build(config)
    model2.load_state_dict(model.state_dict())
    RankAllocator(model2, config).load_state_dict(state)


def test_load_state_dict_rejects_missing_keys():
    alloc = _allocator()
    state = alloc.state_dict()
    del state["generator"]
    with pytest.raises(ValueError, match="missing.*generator"):
        alloc.load_state_dict(state)
