"""The allocator state of a save, for resuming: ``allocator.json`` and ``allocator.safetensors``.

    allocator.json         format, save_id, the state's version, step t, config, layer names,
                           round history, ranks
    allocator.safetensors  the two float32 EMA buffers and the generator state (uint8);
                           its metadata holds the same save_id

This module only reads and writes the two files and checks that they belong to
one save; whether a state fits an allocator is ``RankAllocator.check_state_dict``'s
to say (it runs on every load).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ._files import SaveFiles, read_json, read_safetensors, recover, same_save

STATE_JSON = "allocator.json"
STATE_TENSORS = "allocator.safetensors"
_FORMAT = "elalora-adapter/allocator"
_TENSOR_KEYS = ("ema_ipt", "ema_unc", "generator")
_JSON_KEYS = ("version", "t", "config", "layers", "history", "ranks")
ALLOCATOR_FILES = (STATE_JSON, STATE_TENSORS)


def add_allocator_state(files: SaveFiles, state: dict, save_id: str) -> None:
    """Add a ``RankAllocator.state_dict()`` to a save, as the two files, both marked with ``save_id``."""
    files.safetensors(STATE_TENSORS, {key: state[key] for key in _TENSOR_KEYS},
                      metadata={"format": _FORMAT, "save_id": save_id})
    files.json(STATE_JSON, {"format": _FORMAT, "save_id": save_id, **{key: state[key] for key in _JSON_KEYS}})


def has_allocator_state(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved allocator state (it may still fail the checks on reading)."""
    recover(directory)
    return (Path(directory) / STATE_JSON).is_file()


def read_allocator_state(directory: str | Path, save_id: Optional[str] = None) -> dict:
    """The saved state in ``RankAllocator.state_dict`` form.

    Raises ``ValueError`` when a file is missing or damaged, when the two files
    come from different saves, or (given ``save_id``) from a save other than that one.
    """
    directory = Path(directory)
    recover(directory)
    json_path, tensors_path = directory / STATE_JSON, directory / STATE_TENSORS
    if not (json_path.is_file() and tensors_path.is_file()):
        raise ValueError(f"{directory} holds no allocator state ({STATE_JSON} and {STATE_TENSORS})")
    meta = read_json(json_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{json_path} holds a {type(meta).__name__}, not an allocator state")
    tensors, tensors_meta = read_safetensors(tensors_path)
    if not same_save(meta, tensors_meta):
        raise ValueError(f"{STATE_TENSORS} and {STATE_JSON} in {directory} are files of different saves")
    if save_id is not None and meta.get("save_id") != save_id:
        raise ValueError(f"the allocator state in {directory} is from another save than the adapter beside it")
    if set(tensors) != set(_TENSOR_KEYS):
        raise ValueError(f"{STATE_TENSORS} holds {sorted(tensors)}, expected {', '.join(_TENSOR_KEYS)}")
    # a key missing from the JSON is left out, for check_state_dict to name
    return {**{key: meta[key] for key in _JSON_KEYS if key in meta}, **tensors}


def load_allocator_state(allocator, directory: str | Path) -> None:
    """Restore ``allocator`` from the state saved in ``directory`` (checked first: on an error nothing changes)."""
    allocator.load_state_dict(read_allocator_state(directory))
