"""The save format: ``save_adapter`` / ``load_adapter``, safetensors for tensors, JSON for the rest.

A saved adapter is a directory::

    adapter_config.json        a genuine PEFT LoRA adapter of the current ranks (``elalora.peft_format``):
    adapter_model.safetensors  transformers' PEFT integration, ``PeftModel.from_pretrained`` and
                               LoRA serving stacks load the directory as it is
    elalora_config.json        format, version, save_id, the ElaLoRAConfig (when known), per-layer
                               active rank / r_max / shapes / scale / dtype, extra tensor names,
                               the base model's description, the digest of the PEFT file's data
    elalora_model.safetensors  every slot, active or not: "<layer>.lora_P" [out, r_max],
                               "<layer>.lora_lam" [r_max], "<layer>.lora_Q" [r_max, in], and
                               "extra.<param>" for the modules_to_save (e.g. a head) and other
                               trainable parameters; its metadata holds the same save_id and
                               the digest of its data
    allocator.json,            (optional) the allocator state, for resuming
    allocator.safetensors      (see ``elalora.allocator_files``), with the same save_id

Every save goes through one writer, ``write_save``: ``save_adapter`` (and so
``save_pretrained`` and the Trainer callback) writes all of the files above,
``elalora.export_peft_lora`` only the PEFT pair.

Nothing is ever unpickled: tensors come from safetensors, the rest from JSON.
The files of one save replace the previous save's together or not at all
(``elalora._files.commit_files``): a save killed at any moment leaves the
previous complete save, or the new one. Every file of one save also records
the save's random ``save_id``, so files of two saves put together by hand are
detected on load.

``load_adapter`` is two steps. ``check_adapter`` reads every file, checks it
(the digests of the tensor files' data, see ``elalora._files``) and every key,
shape and dtype against the model (and the allocator, when given), and builds
everything to apply, changing nothing: on any mismatch or damage it raises
``AdapterLoadError`` naming the file. ``_apply`` then copies what was checked
into the model and allocator. Only this layout (version 4) loads; the layouts
of earlier, unreleased development versions do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from . import fsdp, quantized
from ._files import (
    DIGEST_KEY, SaveFiles, check_digest, commit_files, new_save_id, read_json, read_safetensors, recover, same_save,
    tensors_digest,
)
from .allocator_files import ALLOCATOR_FILES, add_allocator_state, read_allocator_state
from .config import ElaLoRAConfig
from .layer import ElaLoRALinear
from .model import adapter_layers, inject, out_in_features, target_names
from .peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, lora_factors, peft_lora_config, saved_module_names

FORMAT = "elalora-adapter"
VERSION = 4  # 4: digests of the data; earlier (unreleased) layouts are not read
CONFIG_NAME = "elalora_config.json"
WEIGHTS_NAME = "elalora_model.safetensors"


class AdapterLoadError(ValueError):
    """A saved adapter does not fit the model (or allocator) it is loaded into."""


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
    """Write the adapters of ``model`` to ``directory``: a PEFT LoRA adapter and elalora's exact state.

    ``config`` (or ``allocator.config``) is stored so that ``load_adapter`` can
    inject a plain base model by itself. With ``allocator``, its state is saved
    too, for resuming bit for bit (optimizer state is the caller's to save).
    With ``include_trainable`` the ``modules_to_save`` of the model's config
    (such as a newly initialised classification head, trainable or frozen) and
    every other trainable parameter outside the adapters are saved as
    ``extra.<name>``, and their modules as PEFT ``modules_to_save``. ``base_model``
    (JSON data describing the base model, as ``save_pretrained`` writes it) is
    stored as is; its ``name_or_path`` becomes PEFT's ``base_model_name_or_path``.
    The files replace an earlier save in ``directory`` all together or not at all.
    Returns the directory. Under FSDP2 call it on every process: all gather the
    adapters, the first process of the mesh writes.
    """
    if config is None and allocator is not None:
        config = allocator.config
    return write_save(
        model, directory, who="save_adapter",
        modules_to_save=saved_module_names(model) if include_trainable else [],
        base_model_name_or_path=(base_model or {}).get("name_or_path"),
        task_type=config.task_type if config is not None else None,
        exact=ExactState(config, base_model, include_trainable),
        allocator=allocator,
    )


@dataclass(frozen=True)
class ExactState:
    """What makes a save elalora's own beside its PEFT files: ``elalora_config.json`` and
    ``elalora_model.safetensors`` record the config, the base model's description and (with
    ``include_trainable``) every trainable parameter outside the adapters."""

    config: Optional[ElaLoRAConfig]
    base_model: Optional[dict]
    include_trainable: bool


def write_save(
    model: nn.Module,
    directory: str | Path,
    *,
    who: str,
    modules_to_save: list[str],
    base_model_name_or_path: Optional[str],
    task_type: Optional[str],
    exact: Optional[ExactState] = None,
    allocator=None,
) -> Path:
    """The one writer of every save: the PEFT LoRA pair, and with ``exact`` elalora's own files (and the
    ``allocator``'s state) beside it, all committed together. ``who`` starts the error messages."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{who}: model has no ElaLoRALinear layers")
    if any(layer.merged for _, layer in layers):
        raise RuntimeError(f"{who}: unmerge the adapters first (merged weights would be saved twice)")
    # gathered whole on every process under FSDP2 (collectives), before only the writer goes on
    slots = {f"{name}.{key}": fsdp.full(getattr(layer, key)) for name, layer in layers for key, _ in layer.SLOTS}
    saved_modules = {
        f"{module}.{pname}": fsdp.full(p)
        for module in modules_to_save for pname, p in model.get_submodule(module).named_parameters()
    }
    extra = _extra_params(model, layers, modules_to_save, exact.include_trainable) if exact is not None else {}
    alloc_state = allocator.state_dict() if allocator is not None else None
    if not fsdp.is_writer(layers[0][1].lora_P):
        return Path(directory)

    ranks = {name: layer.active_rank for name, layer in layers}
    peft_tensors = {f"base_model.model.{pname}": t for pname, t in saved_modules.items()}
    for name, layer in layers:
        a, b = lora_factors(*(slots[f"{name}.{key}"] for key, _ in layer.SLOTS), ranks[name], layer.scale)
        peft_tensors[f"base_model.model.{name}.lora_A.weight"] = a
        peft_tensors[f"base_model.model.{name}.lora_B.weight"] = b
    files = SaveFiles()
    files.safetensors(PEFT_WEIGHTS_NAME, peft_tensors, metadata={"format": "pt"}, digest=False)  # plain PEFT
    files.json(PEFT_CONFIG_NAME, peft_lora_config(
        layers, ranks, modules_to_save=modules_to_save, base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    ))
    if exact is None:
        commit_files(directory, files)
        return Path(directory)
    save_id = new_save_id()
    files.safetensors(WEIGHTS_NAME, {**slots, **{f"extra.{pname}": t for pname, t in extra.items()}},
                      metadata={"format": FORMAT, "save_id": save_id})
    files.json(CONFIG_NAME, {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "config": exact.config.to_dict() if exact.config is not None else None,
        "layers": {name: _layer_record(layer) for name, layer in layers},
        "extra": list(extra),
        "rank_pattern": ranks,
        "base_model": exact.base_model,
        "peft_" + DIGEST_KEY: tensors_digest(peft_tensors),  # the PEFT file stays plain PEFT: its digest is here
    })
    if alloc_state is not None:
        add_allocator_state(files, alloc_state, save_id)
    commit_files(directory, files, remove=ALLOCATOR_FILES)  # a stale allocator state never outlives its save
    return Path(directory)


def _extra_params(model: nn.Module, layers, modules_to_save: list[str], include_trainable: bool) -> dict:
    """Parameter name -> whole tensor of the parameters outside the adapters that a save records: those of
    ``modules_to_save`` and (``include_trainable``) every other trainable one."""
    adapter_params = {id(p) for _, layer in layers for p in layer.slot_params()}
    return {
        pname: fsdp.full(p) for pname, p in model.named_parameters()
        if id(p) not in adapter_params
        and (any(pname.startswith(m + ".") for m in modules_to_save) or (include_trainable and p.requires_grad))
    }


def _layer_record(layer: ElaLoRALinear) -> dict:
    return {
        "rank": layer.active_rank,
        "r_init": layer.r_init,
        "r_max": layer.r_max,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "scale": layer.scale,
        "lora_dropout": layer.lora_dropout,
        "dtype": _dtype_name(layer.lora_P.dtype),
        "quantization": layer.quantization,  # of the base: None (float), "nf4", "fp4" or "int8"
    }


# -------------------------------------------------------------------- load
def load_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    allocator=None,
    strict_extra: bool = True,
) -> dict[str, int]:
    """Load a saved adapter into ``model`` (and its allocator state into ``allocator``).

    If ``model`` holds no adapters yet and the save recorded its config, the
    target layers are injected first (after all checks pass). Every file read
    (its data against its digest), layer name, tensor key, shape and dtype is
    checked before anything is changed; on a mismatch ``AdapterLoadError`` is
    raised and nothing is modified. Returns the loaded rank pattern.
    """
    checked = check_adapter(model, directory, allocator=allocator, strict_extra=strict_extra)
    _apply(model, checked, allocator)
    return checked.ranks


@dataclass
class CheckedAdapter:
    """A save read and checked against a model (and allocator): everything ``load_adapter`` applies."""

    inject: Optional[ElaLoRAConfig]  # the config to inject first, when the model holds no adapters yet
    ranks: dict[str, int]  # layer -> active rank
    slots: dict[str, torch.Tensor]  # "<layer>.<slot>" -> whole tensor
    extra: list[tuple[nn.Parameter, torch.Tensor]]  # a model's parameter and its saved whole tensor
    allocator_state: Optional[dict]


def check_adapter(
    model: nn.Module, directory: str | Path, *, allocator=None, strict_extra: bool = True
) -> CheckedAdapter:
    """Read every file of the save in ``directory`` and check it against ``model`` (and ``allocator``);
    ``AdapterLoadError`` naming the file or tensor on the first problem. Changes nothing."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    tensors = _read_tensor_files(directory, meta)
    to_inject, layer_map = _layers_to_load(model, meta)
    r_max = to_inject.r_max if to_inject is not None else None
    for name, info in meta["layers"].items():
        _check_layer(name, info, layer_map[name], r_max, tensors)
    extra = _check_extra(meta.get("extra", []), tensors, dict(model.named_parameters()), strict_extra)
    expected = {f"{name}.{key}" for name in meta["layers"] for key, _ in ElaLoRALinear.SLOTS}
    unexpected = sorted(set(tensors) - expected - {f"extra.{pname}" for pname in meta.get("extra", [])})
    if unexpected:
        raise AdapterLoadError(f"load_adapter: unexpected tensors in {WEIGHTS_NAME}: {unexpected[:5]}")
    ranks = {name: info["rank"] for name, info in meta["layers"].items()}
    alloc_state = None
    if allocator is not None:
        try:
            alloc_state = read_allocator_state(directory, meta.get("save_id"))
            allocator.check_state_dict(alloc_state, ranks=[ranks.get(n) for n in allocator.names])
        except ValueError as err:
            raise AdapterLoadError(f"load_adapter: {err}") from None
    slots = {key: t for key, t in tensors.items() if key in expected}
    return CheckedAdapter(to_inject, ranks, slots, extra, alloc_state)


def _apply(model: nn.Module, checked: CheckedAdapter, allocator) -> None:
    """Copy a checked save into the model and allocator (every shape and name was checked: nothing fails)."""
    if checked.inject is not None:
        inject(model, checked.inject)
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        for name, rank in checked.ranks.items():
            layer = layers[name]
            for key, _ in layer.SLOTS:
                fsdp.copy_whole_into(getattr(layer, key), checked.slots[f"{name}.{key}"])  # FSDP2: own rows
            layer.set_active_rank(rank)
        for param, whole in checked.extra:
            fsdp.copy_whole_into(param, whole)
    if checked.allocator_state is not None:
        allocator.load_state_dict(checked.allocator_state)


def read_adapter_config(directory: str | Path) -> dict:
    """The checked contents of ``elalora_config.json`` (``AdapterLoadError`` naming the file if it is not one
    this elalora reads, or its ``"config"`` is not a valid ``ElaLoRAConfig``)."""
    directory = Path(directory)
    recover(directory)  # finish a save that was stopped after its commit point
    path = directory / CONFIG_NAME
    if not path.is_file():
        peft_type = _peft_type(directory / PEFT_CONFIG_NAME)
        if peft_type is not None:
            raise AdapterLoadError(
                f"load_adapter: {directory} holds a PEFT {peft_type} adapter but no {CONFIG_NAME}; "
                "load it with peft.PeftModel.from_pretrained (or transformers' from_pretrained)"
            )
        raise AdapterLoadError(f"load_adapter: {path} not found (not an ElaLoRA save)")
    try:
        meta = read_json(path)
    except ValueError as err:
        raise AdapterLoadError(f"load_adapter: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterLoadError(f"load_adapter: {path} is not an ElaLoRA adapter config (format {found!r})")
    if meta.get("version") != VERSION:
        raise AdapterLoadError(
            f"load_adapter: unsupported adapter version {meta.get('version')!r} in {path} (this elalora reads "
            f"version {VERSION}; earlier versions were unreleased development layouts)"
        )
    if meta.get("config") is not None:
        try:
            ElaLoRAConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as err:
            raise AdapterLoadError(f"load_adapter: {path}: {err}") from None
    return meta


def _peft_type(path: Path) -> Optional[str]:
    """The ``peft_type`` of a readable PEFT ``adapter_config.json`` at ``path``, else ``None``."""
    try:
        data = read_json(path) if path.is_file() else None
    except ValueError:
        return None
    return data.get("peft_type") if isinstance(data, dict) else None


def is_saved_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` looks like an elalora save."""
    return (Path(directory) / CONFIG_NAME).is_file()


def _read_tensor_files(directory: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors of ``elalora_model.safetensors``, after checking both tensor files of the save against
    their digests (``AdapterLoadError`` naming the file)."""
    weights_path, peft_path = directory / WEIGHTS_NAME, directory / PEFT_WEIGHTS_NAME
    for path in (weights_path, peft_path):
        if not path.is_file():
            raise AdapterLoadError(f"load_adapter: {path} not found")
    try:
        tensors, tensors_meta = read_safetensors(weights_path)
        # the PEFT file is read only to be checked: transformers and PEFT load it, and it must be whole
        peft_tensors, _ = read_safetensors(peft_path, digest=False)
        check_digest(peft_path, peft_tensors, meta.get("peft_" + DIGEST_KEY))
    except ValueError as err:
        raise AdapterLoadError(f"load_adapter: {err}") from None
    if not same_save(meta, tensors_meta):
        raise AdapterLoadError(
            f"load_adapter: {WEIGHTS_NAME} and its config in {directory} are files of different saves"
        )
    return tensors


def _layers_to_load(model: nn.Module, meta: dict) -> tuple[Optional[ElaLoRAConfig], dict[str, nn.Module]]:
    """The config to inject (``None`` when the model holds adapters already) and the module each saved layer
    loads into: an ElaLoRALinear, or the layer it will wrap once injected."""
    saved = list(meta["layers"])
    present = adapter_layers(model)
    if present:
        if any(layer.merged for _, layer in present):
            raise AdapterLoadError("load_adapter: unmerge the model's adapters before loading")
        _check_names(saved, [n for n, _ in present], "the model's adapters")
        return None, dict(present)
    if meta.get("config") is None:
        raise AdapterLoadError(
            "load_adapter: the model has no ElaLoRA adapters and the save holds no config to inject them; "
            "call elalora.inject(model, config) first"
        )
    to_inject = ElaLoRAConfig.from_dict(meta["config"])
    targets = target_names(model, to_inject)
    _check_names(saved, targets, "the layers the saved config targets in this model")
    return to_inject, {n: model.get_submodule(n) for n in targets}


def _check_layer(name: str, info: dict, module: nn.Module, inject_r_max: Optional[int], tensors: dict) -> None:
    """One saved layer against the module it loads into (``inject_r_max``: the r_max it will be injected with)."""
    out_f, in_f = out_in_features(module)
    if (info["out_features"], info["in_features"]) != (out_f, in_f):
        raise AdapterLoadError(
            f"load_adapter: layer {name!r} is {out_f}×{in_f} in the model but "
            f"{info['out_features']}×{info['in_features']} in the save"
        )
    _check_quantization(name, info.get("quantization"), module)
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
        r_max = inject_r_max
    if not (isinstance(r, int) and 1 <= r <= r_max):
        raise AdapterLoadError(f"load_adapter: layer {name!r} has rank {r!r}, outside [1, {r_max}]")
    for key, shape in ElaLoRALinear.slot_shapes(out_f, in_f, r_max).items():
        full = f"{name}.{key}"
        if full not in tensors:
            raise AdapterLoadError(f"load_adapter: tensor {full!r} is missing from {WEIGHTS_NAME}")
        t = tensors[full]
        if tuple(t.shape) != shape:
            raise AdapterLoadError(
                f"load_adapter: tensor {full!r} has shape {tuple(t.shape)}, expected {shape} "
                f"(rank {r}, r_max {r_max})"
            )
        if not t.is_floating_point():
            raise AdapterLoadError(f"load_adapter: tensor {full!r} has non-float dtype {t.dtype}")


def _check_extra(saved: list[str], tensors: dict, params: dict, strict: bool) -> list:
    """The model's parameter and its saved tensor, for each saved extra parameter that the model has (with
    ``strict``, a saved one the model lacks is an error)."""
    extra = []
    for pname in saved:
        full = f"extra.{pname}"
        if full not in tensors:
            raise AdapterLoadError(f"load_adapter: tensor {full!r} is missing from {WEIGHTS_NAME}")
        if pname not in params:
            if strict:
                raise AdapterLoadError(f"load_adapter: saved parameter {pname!r} does not exist in the model")
            continue
        if tuple(tensors[full].shape) != tuple(params[pname].shape):
            raise AdapterLoadError(
                f"load_adapter: parameter {pname!r} has shape {tuple(params[pname].shape)} in the model "
                f"but {tuple(tensors[full].shape)} in the save"
            )
        extra.append((params[pname], tensors[full]))
    return extra


def _check_quantization(name: str, saved: str | None, module: nn.Module) -> None:
    """An adapter trained on one quantized base loads only onto a base quantized the same way.

    A float base takes any adapter (as PEFT allows: how a QLoRA adapter is merged
    into full-precision weights), and a float-trained adapter loads onto a
    quantized base; two different quantizations are refused.
    """
    present = module.quantization if isinstance(module, ElaLoRALinear) else quantized.base_kind(module)
    if saved is not None and present is not None and saved != present:
        raise AdapterLoadError(
            f"load_adapter: layer {name!r} was trained on a {saved} base but the model's base is {present}; "
            f"load the base model quantized as {saved} (or as a float model)"
        )


def _check_names(saved: list[str], model_names: list[str], what: str) -> None:
    missing = [n for n in saved if n not in set(model_names)]
    extra = [n for n in model_names if n not in set(saved)]
    if missing or extra:
        raise AdapterLoadError(
            f"load_adapter: the save's {len(saved)} adapted layers do not match {what} ({len(model_names)}): "
            f"in the save only: {missing[:5]}{' …' if len(missing) > 5 else ''}; "
            f"in the model only: {extra[:5]}{' …' if len(extra) > 5 else ''}"
        )
