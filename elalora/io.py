"""Save and load ElaLoRA adapters: safetensors for tensors, JSON for everything else.

A saved adapter is a directory::

    adapter_config.json        format, version, the ElaLoRAConfig (when known), per-layer
                               active rank / r_max / shapes / scale / dtype, extra tensor names,
                               and the SHA-256 of adapter_model.safetensors
    adapter_model.safetensors  "<layer>.lora_P" [out, rank], "<layer>.lora_lam" [rank],
                               "<layer>.lora_Q" [rank, in] — active slots only — and
                               "extra.<param>" for other trainable parameters (e.g. a head)
    allocator.json             (optional) step, config, layer names, round history, ranks
    allocator.safetensors      (optional) the two float32 EMA buffers and the generator state (uint8)

Nothing is ever unpickled: tensors come from safetensors, the rest from JSON.
Every file is written to a temporary file in the same directory and renamed
into place; the JSON files name the SHA-256 of their safetensors partner, so a
directory holding files of two different saves is detected on load.

``load_adapter`` checks every key, shape and dtype against the model (and the
allocator, when given) before it changes anything: on any mismatch it raises
``AdapterLoadError`` and the model and allocator are left untouched. Inactive
slots are not stored; on load they are set to zero (they never influence a
forward pass, a gradient, a score or a round: a slot that becomes active is
re-initialised by the allocator).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import fsdp
from .config import ElaLoRAConfig
from .layer import ElaLoRALinear
from .model import adapter_layers, inject, out_in_features, target_names

FORMAT = "elalora-adapter"
VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ALLOC_JSON = "allocator.json"
ALLOC_TENSORS = "allocator.safetensors"
SLOT_TENSORS = ("lora_P", "lora_lam", "lora_Q")


class AdapterLoadError(ValueError):
    """A saved adapter does not fit the model (or allocator) it is loaded into."""


# ------------------------------------------------------------ atomic files
def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")

    _atomic_write(Path(path), write)


def write_safetensors_atomic(path: str | Path, tensors: dict, metadata: Optional[dict] = None) -> str:
    """Write tensors via a temporary file and a rename; returns the file's SHA-256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return _sha256(path)


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -------------------------------------------------------------------- save
def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    allocator=None,
    config: Optional[ElaLoRAConfig] = None,
    include_trainable: bool = True,
    base_model: Optional[dict] = None,
) -> Path:
    """Write the adapters of ``model`` (active slots only) to ``directory``.

    ``config`` (or ``allocator.config``) is stored so that ``load_adapter`` can
    inject a plain base model by itself. With ``allocator``, its state is saved
    too, for resuming bit for bit (optimizer state is the caller's to save).
    With ``include_trainable`` every other trainable parameter outside the
    adapters (such as a newly initialised classification head) is saved as
    ``extra.<name>``. ``base_model`` (JSON data describing the base model, as
    ``save_pretrained`` writes it) is stored as is. Returns the directory. Under FSDP2 call it on every process:
    all gather the adapters, the first process of the mesh writes.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("save_adapter: model has no ElaLoRALinear layers")
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("save_adapter: unmerge the adapters first (merged weights would be saved twice)")
    if config is None and allocator is not None:
        config = allocator.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    meta_layers = {}
    for name, layer in layers:
        r = layer.active_rank
        tensors[f"{name}.lora_P"] = fsdp.full(layer.lora_P)[:, :r]
        tensors[f"{name}.lora_lam"] = fsdp.full(layer.lora_lam)[:r]
        tensors[f"{name}.lora_Q"] = fsdp.full(layer.lora_Q)[:r]
        meta_layers[name] = {
            "rank": r,
            "r_init": layer.r_init,
            "r_max": layer.r_max,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "scale": layer.scale,
            "lora_dropout": layer.lora_dropout,
            "dtype": _dtype_name(layer.lora_P.dtype),
        }
    extra = []
    if include_trainable:
        adapter_params = {id(p) for _, layer in layers for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)}
        for pname, p in model.named_parameters():
            if p.requires_grad and id(p) not in adapter_params:
                tensors[f"extra.{pname}"] = fsdp.full(p)
                extra.append(pname)

    alloc_state = allocator.state_dict() if allocator is not None else None  # a collective under FSDP2
    if not fsdp.is_writer(layers[0][1].lora_P):
        return directory
    digest = write_safetensors_atomic(directory / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
    if alloc_state is not None:
        _save_allocator(alloc_state, directory)
    else:  # a stale allocator state from an earlier save must not pair with these weights
        for stale in (ALLOC_JSON, ALLOC_TENSORS):
            if (directory / stale).exists():
                (directory / stale).unlink()
    write_json_atomic(
        directory / CONFIG_NAME,
        {
            "format": FORMAT,
            "version": VERSION,
            "config": config.to_dict() if config is not None else None,
            "layers": meta_layers,
            "extra": extra,
            "weights_sha256": digest,
            "rank_pattern": {name: meta["rank"] for name, meta in meta_layers.items()},
            "base_model": base_model,
        },
    )
    return directory


def _save_allocator(state: dict, directory: Path) -> None:
    generator = state["generator"]
    digest = write_safetensors_atomic(
        directory / ALLOC_TENSORS,
        {"ema_ipt": state["ema_ipt"], "ema_unc": state["ema_unc"], "generator": generator},
        metadata={"format": FORMAT},
    )
    write_json_atomic(
        directory / ALLOC_JSON,
        {
            "format": FORMAT + "/allocator",
            "version": state["version"],
            "t": state["t"],
            "config": state["config"],
            "layers": state["layers"],
            "history": state["history"],
            "ranks": state["ranks"],
            "tensors_sha256": digest,
        },
    )


# -------------------------------------------------------------------- load
def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"load_adapter: {path} not found (not an ElaLoRA adapter directory)")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterLoadError(f"load_adapter: {path} is not an ElaLoRA adapter config (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise AdapterLoadError(
            f"load_adapter: unsupported adapter version {meta.get('version')!r} (expected {VERSION})"
        )
    return meta


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    allocator=None,
    strict_extra: bool = True,
) -> dict[str, int]:
    """Load a saved adapter into ``model`` (and its allocator state into ``allocator``).

    If ``model`` holds no adapters yet and the save recorded its config, the
    target layers are injected first (after all checks pass). Every layer name,
    tensor key, shape and dtype is checked before anything is changed; on a
    mismatch ``AdapterLoadError`` is raised and nothing is modified. Returns the
    loaded rank pattern.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterLoadError(f"load_adapter: {weights_path} not found")
    if _sha256(weights_path) != meta.get("weights_sha256"):
        raise AdapterLoadError(
            f"load_adapter: {weights_path} does not match {CONFIG_NAME} (checksum differs): "
            "the directory mixes files of different saves"
        )
    tensors = load_file(str(weights_path))
    saved_layers: dict = meta["layers"]

    present = adapter_layers(model)
    to_inject: Optional[ElaLoRAConfig] = None
    if present:
        layer_map = dict(present)
        if any(layer.merged for layer in layer_map.values()):
            raise AdapterLoadError("load_adapter: unmerge the model's adapters before loading")
        _check_names(list(saved_layers), [n for n, _ in present], "the model's adapters")
    else:
        if meta.get("config") is None:
            raise AdapterLoadError(
                "load_adapter: the model has no ElaLoRA adapters and the save holds no config to inject them; "
                "call elalora.inject(model, config) first"
            )
        to_inject = ElaLoRAConfig.from_dict(meta["config"])
        targets = target_names(model, to_inject)
        _check_names(list(saved_layers), targets, "the layers the saved config targets in this model")
        layer_map = {n: model.get_submodule(n) for n in targets}

    # ---- check every layer, key, shape and dtype before touching anything
    expected_keys = set()
    for name, info in saved_layers.items():
        module = layer_map[name]
        out_f, in_f = out_in_features(module)
        if (info["out_features"], info["in_features"]) != (out_f, in_f):
            raise AdapterLoadError(
                f"load_adapter: layer {name!r} is {out_f}×{in_f} in the model but "
                f"{info['out_features']}×{info['in_features']} in the save"
            )
        r = info["rank"]
        if isinstance(module, ElaLoRALinear):
            if module.r_max != info["r_max"]:
                raise AdapterLoadError(
                    f"load_adapter: layer {name!r} has r_max={module.r_max} in the model "
                    f"but {info['r_max']} in the save"
                )
            if not math.isclose(module.scale, info["scale"], rel_tol=1e-12):
                raise AdapterLoadError(
                    f"load_adapter: layer {name!r} has scale {module.scale} in the model "
                    f"but {info['scale']} in the save"
                )
            r_max = module.r_max
        else:
            r_max = to_inject.r_max
        if not (isinstance(r, int) and 1 <= r <= r_max):
            raise AdapterLoadError(f"load_adapter: layer {name!r} has rank {r!r}, outside [1, {r_max}]")
        shapes = {"lora_P": (out_f, r), "lora_lam": (r,), "lora_Q": (r, in_f)}
        for key, shape in shapes.items():
            full = f"{name}.{key}"
            expected_keys.add(full)
            if full not in tensors:
                raise AdapterLoadError(f"load_adapter: tensor {full!r} is missing from {WEIGHTS_NAME}")
            t = tensors[full]
            if tuple(t.shape) != shape:
                raise AdapterLoadError(
                    f"load_adapter: tensor {full!r} has shape {tuple(t.shape)}, expected {shape} (rank {r})"
                )
            if not t.is_floating_point():
                raise AdapterLoadError(f"load_adapter: tensor {full!r} has non-float dtype {t.dtype}")
    params = dict(model.named_parameters())
    extra = meta.get("extra", [])
    for pname in extra:
        full = f"extra.{pname}"
        expected_keys.add(full)
        if full not in tensors:
            raise AdapterLoadError(f"load_adapter: tensor {full!r} is missing from {WEIGHTS_NAME}")
        if pname not in params:
            if strict_extra:
                raise AdapterLoadError(f"load_adapter: saved parameter {pname!r} does not exist in the model")
            continue
        if tuple(tensors[full].shape) != tuple(params[pname].shape):
            raise AdapterLoadError(
                f"load_adapter: parameter {pname!r} has shape {tuple(params[pname].shape)} in the model "
                f"but {tuple(tensors[full].shape)} in the save"
            )
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise AdapterLoadError(f"load_adapter: unexpected tensors in {WEIGHTS_NAME}: {unexpected[:5]}")

    alloc_state = None
    if allocator is not None:
        alloc_state = _read_allocator_state(directory, allocator, list(saved_layers))

    # ---- every check passed: apply
    if to_inject is not None:
        inject(model, to_inject)
        layer_map = dict(adapter_layers(model))
    with torch.no_grad():
        for name, info in saved_layers.items():
            layer = layer_map[name]
            r = info["rank"]
            for key in SLOT_TENSORS:
                param = getattr(layer, key)
                whole = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
                (whole[:, :r] if key == "lora_P" else whole[:r]).copy_(tensors[f"{name}.{key}"])
                fsdp.copy_whole_into(param, whole)  # under FSDP2: this process's rows
            layer.set_active_rank(r)
        for pname in extra:
            if pname in params:
                fsdp.copy_whole_into(params[pname], tensors[f"extra.{pname}"])
    if alloc_state is not None:
        allocator.load_state_dict(alloc_state)
    return {name: info["rank"] for name, info in saved_layers.items()}


def _check_names(saved: list[str], model_names: list[str], what: str) -> None:
    missing = [n for n in saved if n not in set(model_names)]
    extra = [n for n in model_names if n not in set(saved)]
    if missing or extra:
        raise AdapterLoadError(
            f"load_adapter: the save's {len(saved)} adapted layers do not match {what} ({len(model_names)}): "
            f"in the save only: {missing[:5]}{' …' if len(missing) > 5 else ''}; "
            f"in the model only: {extra[:5]}{' …' if len(extra) > 5 else ''}"
        )


def _read_allocator_state(directory: Path, allocator, saved_layers: list[str]) -> dict:
    """Read and fully check an allocator state; returns it in ``RankAllocator.state_dict`` form."""
    json_path, tensor_path = directory / ALLOC_JSON, directory / ALLOC_TENSORS
    if not (json_path.is_file() and tensor_path.is_file()):
        raise AdapterLoadError(f"load_adapter: an allocator was given but {directory} holds no allocator state")
    with open(json_path, encoding="utf-8") as f:
        meta = json.load(f)
    if _sha256(tensor_path) != meta.get("tensors_sha256"):
        raise AdapterLoadError(f"load_adapter: {tensor_path} does not match {ALLOC_JSON} (checksum differs)")
    tensors = load_file(str(tensor_path))
    if set(tensors) != {"ema_ipt", "ema_unc", "generator"}:
        raise AdapterLoadError(
            f"load_adapter: {ALLOC_TENSORS} holds {sorted(tensors)}, expected ema_ipt, ema_unc, generator"
        )
    state = allocator.state_dict()
    if meta.get("version") != state["version"]:
        raise AdapterLoadError(f"load_adapter: allocator state version {meta.get('version')} != {state['version']}")
    if "ranks" not in meta:
        raise AdapterLoadError(f"load_adapter: {ALLOC_JSON} has no 'ranks' (written by an older elalora)")
    if meta["layers"] != allocator.names or meta["layers"] != saved_layers:
        raise AdapterLoadError("load_adapter: the allocator state is for different layers than this allocator's")
    diff = {k: (v, state["config"].get(k)) for k, v in meta["config"].items() if state["config"].get(k) != v}
    if diff:
        raise AdapterLoadError(f"load_adapter: allocator config differs (saved, current): {diff}")
    for key in ("ema_ipt", "ema_unc"):
        t = tensors[key]
        if t.dtype != torch.float32 or t.shape != state[key].shape:
            raise AdapterLoadError(
                f"load_adapter: allocator {key} is {t.dtype} {tuple(t.shape)}, "
                f"expected float32 {tuple(state[key].shape)}"
            )
    gen = tensors["generator"]
    try:
        torch.Generator().set_state(gen)
    except (RuntimeError, TypeError) as err:
        raise AdapterLoadError(f"load_adapter: allocator generator state is invalid: {err}") from None
    return {
        "version": meta["version"],
        "t": meta["t"],
        "config": meta["config"],
        "layers": meta["layers"],
        "ema_ipt": tensors["ema_ipt"].to(state["ema_ipt"].device),
        "ema_unc": tensors["ema_unc"].to(state["ema_unc"].device),
        "generator": gen,
        "history": meta["history"],
        "ranks": meta["ranks"],
    }


def load_allocator_state(allocator, directory: str | Path) -> None:
    """Restore only the allocator state saved in ``directory`` (checked first, as in ``load_adapter``)."""
    directory = Path(directory)
    with open(directory / ALLOC_JSON, encoding="utf-8") as f:
        layers = json.load(f)["layers"]
    allocator.load_state_dict(_read_allocator_state(directory, allocator, layers))


def save_allocator_state(allocator, directory: str | Path) -> None:
    """Write only the allocator state (``allocator.json`` + ``allocator.safetensors``) to ``directory``."""
    directory = Path(directory)
    state = allocator.state_dict()  # a collective under FSDP2
    if fsdp.is_writer(allocator.params[0]):
        directory.mkdir(parents=True, exist_ok=True)
        _save_allocator(state, directory)
