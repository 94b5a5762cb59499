"""A save replaces the previous one whole or not at all, even when its process is killed at any moment."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

import elalora
from elalora import _files
from elalora.io import load_adapter, save_adapter

from fixtures import TOY_INPUT, Toy, trained_toy

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even the writer's clean-up."""


def _two_saves():
    a, cfg = trained_toy(seed=0)
    b, _ = trained_toy(seed=0)  # the same base weights, other adapters and ranks
    with torch.no_grad():
        for _, layer in elalora.adapter_layers(b):
            layer.lora_lam.mul_(-2)
            layer.set_active_rank(layer.r_max + 1 - layer.active_rank)
    return (a, elalora.RankAllocator(a, cfg)), (b, elalora.RankAllocator(b, cfg)), cfg


def _loaded_output(directory, cfg):
    fresh = Toy(seed=0)
    elalora.inject(fresh, cfg)
    load_adapter(fresh, directory, allocator=elalora.RankAllocator(fresh, cfg))  # the allocator state must pair
    with torch.no_grad():
        return fresh(TOY_INPUT)


def _kill_at_rename(monkeypatch, allowed):
    """Let ``allowed`` renames of a save through, then 'kill' the writer at the next one."""
    real = os.replace
    done = []

    def replace(src, dst):
        if len(done) == allowed:
            raise Killed
        done.append(dst)
        real(src, dst)

    monkeypatch.setattr(_files.os, "replace", replace)
    monkeypatch.setattr(_files.Path, "unlink", lambda *a, **k: None)  # a killed writer cleans nothing up
    return done


def test_killed_before_its_commit_point_the_previous_save_stays(tmp_path, monkeypatch):
    (a, alloc_a), (b, alloc_b), cfg = _two_saves()
    save_adapter(a, tmp_path, allocator=alloc_a)
    _kill_at_rename(monkeypatch, allowed=0)  # the journal's rename is the first
    with pytest.raises(Killed):
        save_adapter(b, tmp_path, allocator=alloc_b)
    monkeypatch.undo()
    assert list(tmp_path.glob(".*.tmp"))  # the new save's files, never committed
    with torch.no_grad():
        assert torch.equal(_loaded_output(tmp_path, cfg), a(TOY_INPUT))
    save_adapter(b, tmp_path, allocator=alloc_b)  # the next save clears them away
    assert not list(tmp_path.glob(".*.tmp"))
    with torch.no_grad():
        assert torch.equal(_loaded_output(tmp_path, cfg), b(TOY_INPUT))


@pytest.mark.parametrize("renamed", [1, 3, 5])
def test_killed_after_its_commit_point_a_reader_finishes_the_save(tmp_path, monkeypatch, renamed):
    (a, alloc_a), (b, alloc_b), cfg = _two_saves()
    save_adapter(a, tmp_path, allocator=alloc_a)
    done = _kill_at_rename(monkeypatch, allowed=1 + renamed)  # the journal, then `renamed` of the six files
    with pytest.raises(Killed):
        save_adapter(b, tmp_path, allocator=alloc_b)
    monkeypatch.undo()
    assert len(done) == 1 + renamed and (tmp_path / _files.JOURNAL).is_file()
    with torch.no_grad():
        assert torch.equal(_loaded_output(tmp_path, cfg), b(TOY_INPUT))
    assert not (tmp_path / _files.JOURNAL).exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.subprocess
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_writer_killed_at_random_moments_never_loses_the_previous_save(tmp_path):
    """A forked writer saves two adapters in turns and is SIGKILLed at a random moment, over and over."""
    (a, alloc_a), (b, alloc_b), cfg = _two_saves()
    with torch.no_grad():
        expected = {"a": a(TOY_INPUT), "b": b(TOY_INPUT)}
    save_adapter(a, tmp_path, allocator=alloc_a)
    start = time.perf_counter()
    save_adapter(a, tmp_path, allocator=alloc_a)
    one_save = time.perf_counter() - start

    rng = random.Random(0)
    seen = {"a": 0, "b": 0}
    for i in range(20):
        started, ready = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: one byte down the pipe as each save starts
            try:
                while True:
                    for name, model, alloc in (("b", b, alloc_b), ("a", a, alloc_a)):
                        os.write(ready, name.encode())
                        save_adapter(model, tmp_path, allocator=alloc)
            finally:
                os._exit(0)
        os.close(ready)
        # The moment is drawn from the start of a save of each kind in turn, not from the fork's: a writer
        # slower than the parent's timing (a fresh machine's first saves) once took every kill in its first save.
        target = "ab"[i % 2].encode()
        while (byte := os.read(started, 1)) != target:
            assert byte, "the writer died before its next save"
        time.sleep(rng.uniform(0, 1.5 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(started)
        got = _loaded_output(tmp_path, cfg)  # one complete save: loads, and its allocator state pairs
        which = [k for k, out in expected.items() if torch.equal(got, out)]
        assert len(which) == 1
        seen[which[0]] += 1
    assert seen["a"] and seen["b"], seen  # kills landed in saves of both
