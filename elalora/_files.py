"""Files written whole or not at all, safetensors read with their metadata, files of one save paired.

Every write goes to a temporary file in the target's directory, is flushed to
disk, and is renamed into place: a reader sees the old file or the new one,
never a partial one, and a failed write leaves no temporary file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
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


def write_safetensors_atomic(path: str | Path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """Write tensors (moved to the CPU) via a temporary file and a rename."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file; ``ValueError`` naming the file if it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


# ------------------------------------------------- files of one save
def new_save_id() -> str:
    """A fresh id that every file of one save records, so that files of different saves are told apart."""
    return uuid.uuid4().hex


def same_save(json_meta: dict, tensors_meta: dict, tensors_path: Path, legacy_sha256_key: str) -> bool:
    """Whether a JSON file and a safetensors file were written by the same save.

    Both record the save's ``save_id``; files written before save ids existed
    instead name the SHA-256 of the safetensors file in the JSON (``legacy_sha256_key``).
    """
    if "save_id" in json_meta:
        return tensors_meta.get("save_id") == json_meta["save_id"]
    digest = hashlib.sha256()
    with open(tensors_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == json_meta.get(legacy_sha256_key)
