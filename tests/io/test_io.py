"""save_adapter / load_adapter: exact round trip, PEFT files beside ours, allocator resume, checks, atomicity."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import elalora
from elalora import _files
from elalora.allocator_files import load_allocator_state
from elalora.io import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, load_adapter, save_adapter

from fixtures import TOY_INPUT, Toy, toy_config, trained_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def active_view(model):
    out = {}
    for name, layer in elalora.adapter_layers(model):
        r = layer.active_rank
        out[name] = (r, layer.lora_P[:, :r].clone(), layer.lora_lam[:r].clone(), layer.lora_Q[:r].clone())
    return out


def test_round_trip_is_exact_and_stores_every_slot(tmp_path):
    model, cfg = trained_toy()
    model.head.weight.requires_grad_(True)  # a trained head is stored as extra tensors, its whole module (as PEFT)
    with torch.no_grad():
        model.head.weight.mul_(3)
    save_adapter(model, tmp_path, config=cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    for name, layer in elalora.adapter_layers(model):
        assert torch.equal(tensors[f"{name}.lora_P"], layer.lora_P)  # inactive slots too
        assert torch.equal(tensors[f"{name}.lora_lam"], layer.lora_lam)
        assert torch.equal(tensors[f"{name}.lora_Q"], layer.lora_Q)
    assert torch.equal(tensors["extra.head.weight"], model.head.weight)
    assert torch.equal(tensors["extra.head.bias"], model.head.bias)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["rank_pattern"] == {n: m.active_rank for n, m in elalora.adapter_layers(model)}
    # under PEFT's names: a PEFT LoRA adapter of the active ranks, the head as a module to save
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["modules_to_save"] == ["head"]
    assert sorted(peft_config["rank_pattern"].values()) == sorted(meta["rank_pattern"].values())

    other = Toy(seed=0)  # the same base weights, different adapter init
    elalora.inject(other, toy_config(seed=7))
    pattern = load_adapter(other, tmp_path)
    assert pattern == meta["rank_pattern"]
    assert_same_state(snapshot(other), snapshot(model))  # every slot, mask and the head, bit for bit
    with torch.no_grad():
        assert torch.equal(other(TOY_INPUT), model(TOY_INPUT))


def test_load_into_plain_base_injects_from_saved_config(tmp_path):
    model, cfg = trained_toy()
    save_adapter(model, tmp_path, config=cfg)
    base = Toy(seed=0)
    load_adapter(base, tmp_path)
    assert [n for n, _ in elalora.adapter_layers(base)] == [n for n, _ in elalora.adapter_layers(model)]
    with torch.no_grad():
        assert torch.equal(base(TOY_INPUT), model(TOY_INPUT))


def test_plain_base_without_saved_config_is_a_clear_error(tmp_path):
    model, _ = trained_toy()
    save_adapter(model, tmp_path)  # no config, no allocator
    base = Toy(seed=0)
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match="inject"):
        load_adapter(base, tmp_path)
    assert_same_state(before, snapshot(base))


def _train_steps(model, allocator, steps, seed):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)  # stateless: exact resume
    allocator.optimizer = opt
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(9, 12, generator=g)
        loss = model(x).pow(2).mean() + allocator.orth_penalty()
        loss.backward()
        opt.step()
        allocator.step()
        opt.zero_grad(set_to_none=True)


def test_allocator_state_resumes_bit_for_bit(tmp_path):
    cfg = toy_config()
    a = Toy(seed=0)
    elalora.inject(a, cfg)
    alloc_a = elalora.RankAllocator(a, cfg)
    _train_steps(a, alloc_a, 6, seed=1)
    save_adapter(a, tmp_path, allocator=alloc_a)
    assert (tmp_path / "allocator.json").is_file() and (tmp_path / "allocator.safetensors").is_file()
    gen = load_file(str(tmp_path / "allocator.safetensors"))["generator"]
    assert gen.dtype == torch.uint8

    b = Toy(seed=0)
    elalora.inject(b, toy_config(seed=0))
    alloc_b = elalora.RankAllocator(b, cfg)
    load_adapter(b, tmp_path, allocator=alloc_b)
    assert alloc_b.t == alloc_a.t == 6
    assert len(alloc_b.history) == len(alloc_a.history)
    _train_steps(a, alloc_a, 8, seed=2)
    _train_steps(b, alloc_b, 8, seed=2)
    assert alloc_a.history and [r.ranks for r in alloc_a.history] == [r.ranks for r in alloc_b.history]
    assert torch.equal(alloc_a.ema_ipt, alloc_b.ema_ipt)
    va, vb = active_view(a), active_view(b)
    for name in va:
        assert va[name][0] == vb[name][0]
        for x, y in zip(va[name][1:], vb[name][1:]):
            assert torch.equal(x, y), name
    with torch.no_grad():
        assert torch.equal(a(TOY_INPUT), b(TOY_INPUT))


# ------------------------------------------------------------ mismatches
def _expect_untouched(model, directory, match, **kw):
    before = snapshot(model)
    ranks = [m.active_rank for _, m in elalora.adapter_layers(model)]
    with pytest.raises(AdapterLoadError, match=match):
        load_adapter(model, directory, **kw)
    assert_same_state(before, snapshot(model))
    assert ranks == [m.active_rank for _, m in elalora.adapter_layers(model)]


def _rewrite_weights(directory, edit):
    path = directory / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()  # keeps the save id and makes a new digest: a consistent but wrong save
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={**metadata, _files.DIGEST_KEY: _files.tensors_digest(tensors)})


def test_mismatches_raise_and_leave_model_untouched(tmp_path):
    model, cfg = trained_toy()
    save_adapter(model, tmp_path / "good", config=cfg)

    # different layer set
    target, _ = trained_toy(target_modules=("query", "value"))
    _expect_untouched(target, tmp_path / "good", "do not match")
    # different width
    wide = Toy(d=16, seed=0)
    elalora.inject(wide, cfg)
    _expect_untouched(wide, tmp_path / "good", "16×16|16")
    # different r_max
    rmax, _ = trained_toy(r_max=5)
    _expect_untouched(rmax, tmp_path / "good", "r_max")
    # different scale
    scaled, _ = trained_toy(lora_alpha=7.0)
    _expect_untouched(scaled, tmp_path / "good", "scale")

    fresh, _ = trained_toy(seed=3)
    for label, edit, match in [
        ("missing", lambda t: t.pop("layer.0.query.lora_Q"), "missing"),
        ("extra", lambda t: t.__setitem__("layer.0.query.bogus", torch.zeros(1)), "unexpected"),
        ("shape", lambda t: t.__setitem__("layer.0.query.lora_lam", torch.zeros(2)), "shape"),
        ("dtype", lambda t: t.__setitem__("layer.0.query.lora_lam", torch.zeros(6, dtype=torch.int32)), "dtype"),
    ]:
        d = tmp_path / label
        save_adapter(model, d, config=cfg)
        _rewrite_weights(d, edit)
        _expect_untouched(fresh, d, match)

    # files of two different saves
    d = tmp_path / "mixed"
    save_adapter(model, d, config=cfg)
    other, _ = trained_toy(seed=4)
    save_adapter(other, tmp_path / "other", config=cfg)
    (tmp_path / "other" / WEIGHTS_NAME).replace(d / WEIGHTS_NAME)
    _expect_untouched(fresh, d, "files of different saves")
    # a damaged weights file
    d = tmp_path / "truncated"
    save_adapter(model, d, config=cfg)
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _expect_untouched(fresh, d, "not a readable safetensors file")

    # rank out of range in the JSON
    d = tmp_path / "rank"
    save_adapter(model, d, config=cfg)
    meta = json.loads((d / CONFIG_NAME).read_text())
    meta["layers"]["layer.0.query"]["rank"] = 9
    (d / CONFIG_NAME).write_text(json.dumps(meta))
    _expect_untouched(fresh, d, "rank 9|shape")

    _expect_untouched(fresh, tmp_path / "nowhere", "not found")


def test_allocator_mismatch_leaves_model_and_allocator_untouched(tmp_path):
    model, cfg = trained_toy()
    alloc = elalora.RankAllocator(model, cfg)
    save_adapter(model, tmp_path, allocator=alloc)
    other, _ = trained_toy(seed=2)
    other_alloc = elalora.RankAllocator(other, cfg.replace(beta1=0.5))
    ema = other_alloc.ema_ipt.clone()
    _expect_untouched(other, tmp_path, "config differs", allocator=other_alloc)
    assert torch.equal(ema, other_alloc.ema_ipt) and other_alloc.t == 0
    # an allocator was given but the save has none
    save_adapter(model, tmp_path / "noalloc", config=cfg)
    _expect_untouched(other, tmp_path / "noalloc", "no allocator state", allocator=elalora.RankAllocator(other, cfg))


def test_allocator_files_of_another_save_are_detected(tmp_path):
    model, cfg = trained_toy()
    alloc = elalora.RankAllocator(model, cfg)
    save_adapter(model, tmp_path / "a", allocator=alloc)
    save_adapter(model, tmp_path / "b", allocator=alloc)  # the same contents, another save
    other, _ = trained_toy(seed=2)
    other_alloc = elalora.RankAllocator(other, cfg)
    # both allocator files from the other save: they pair with each other, not with the adapter
    for name in ("allocator.json", "allocator.safetensors"):
        shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    _expect_untouched(other, tmp_path / "a", "another save", allocator=other_alloc)
    # one allocator file from a third save: the two do not pair
    save_adapter(model, tmp_path / "c", allocator=alloc)
    shutil.copy(tmp_path / "c" / "allocator.safetensors", tmp_path / "a" / "allocator.safetensors")
    _expect_untouched(other, tmp_path / "a", "files of different saves", allocator=other_alloc)
    with pytest.raises(ValueError, match="files of different saves"):
        load_allocator_state(other_alloc, tmp_path / "a")
    assert other_alloc.t == 0 and not other_alloc.ema_ipt.any()


def test_invalid_allocator_state_changes_nothing(tmp_path):
    model, cfg = trained_toy()
    alloc = elalora.RankAllocator(model, cfg)
    save_adapter(model, tmp_path, allocator=alloc)
    path = tmp_path / "allocator.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["ema_ipt"] = torch.ones_like(tensors["ema_ipt"])
    tensors["generator"] = torch.zeros(3, dtype=torch.uint8)
    save_file(tensors, str(path), metadata={**metadata, _files.DIGEST_KEY: _files.tensors_digest(tensors)})
    other, _ = trained_toy(seed=2)
    other_alloc = elalora.RankAllocator(other, cfg)
    _expect_untouched(other, tmp_path, "generator state is invalid", allocator=other_alloc)
    assert not other_alloc.ema_ipt.any()  # the EMAs were not copied before the generator was checked


@pytest.mark.parametrize("damage", ["truncated", "garbled", "not an object"])
def test_damaged_config_json_is_a_load_error_naming_the_file(tmp_path, damage):
    model, cfg = trained_toy()
    alloc = elalora.RankAllocator(model, cfg)
    for name in (CONFIG_NAME, "allocator.json"):
        d = tmp_path / damage / name
        save_adapter(model, d, allocator=alloc)
        text = (d / name).read_text()
        damaged = {"truncated": text[: len(text) // 2], "garbled": "\x00{]" + text, "not an object": "[1, 2]"}
        (d / name).write_text(damaged[damage])
        fresh = Toy(seed=0)
        elalora.inject(fresh, cfg)
        with pytest.raises(AdapterLoadError, match=f"{name}.*(JSON|not an)"):
            load_adapter(fresh, d, allocator=elalora.RankAllocator(fresh, cfg))


def test_a_peft_adapter_without_elalora_state_says_what_loads_it(tmp_path):
    model, _ = trained_toy()
    elalora.export_peft_lora(model, tmp_path)
    with pytest.raises(AdapterLoadError, match="PeftModel.from_pretrained"):
        load_adapter(Toy(seed=0), tmp_path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    model, cfg = trained_toy()
    save_adapter(model, tmp_path, config=cfg)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(_files, "save_file", broken)
    other, _ = trained_toy(seed=9)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(other, tmp_path, config=cfg)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # old save intact, no temp files left behind
    monkeypatch.undo()
    fresh = Toy(seed=0)
    elalora.inject(fresh, toy_config(seed=5))
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(TOY_INPUT), model(TOY_INPUT))


def test_merged_model_cannot_be_saved_or_loaded(tmp_path):
    model, cfg = trained_toy()
    save_adapter(model, tmp_path, config=cfg)
    elalora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        save_adapter(model, tmp_path / "x")
    _expect_untouched(model, tmp_path, "unmerge")


# ------------------------------------------------------------ corruption
def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _offsets(path: Path) -> dict[str, int]:
    """Where to flip a byte: a safetensors file's length prefix, header and data (first, middle, last byte)."""
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        return {"start": 0, "middle": size // 2, "end": size - 2}
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return {"length": 0, "header": 12, "data start": data_start, "data middle": (data_start + size) // 2,
            "data end": size - 1}


def test_a_flipped_byte_in_any_file_read_is_a_load_error_naming_it(tmp_path):
    """safetensors checks a file's header, not its data: each tensor file's digest catches the rest."""
    model, cfg = trained_toy()
    alloc = elalora.RankAllocator(model, cfg)
    good = tmp_path / "good"
    save_adapter(model, good, allocator=alloc)
    read = [CONFIG_NAME, WEIGHTS_NAME, "adapter_model.safetensors", "allocator.json", "allocator.safetensors"]
    for name in read:
        for where, offset in _offsets(good / name).items():
            d = tmp_path / f"{name}-{where}"
            shutil.copytree(good, d)
            _flip(d / name, offset)
            fresh, _ = trained_toy(seed=3)
            fresh_alloc = elalora.RankAllocator(fresh, cfg)
            _expect_untouched(fresh, d, name.replace(".", r"\."), allocator=fresh_alloc)
            assert fresh_alloc.t == 0 and not fresh_alloc.ema_ipt.any()
