"""Files written whole or not at all, saves of several files committed as one, safetensors and JSON read safely.

Every write goes to a temporary file in the target's directory, is flushed to
disk, and is renamed into place: a reader sees the old file or the new one,
never a partial one, and a failed write leaves no temporary file behind.

A save of several files (``commit_files``) is made all-or-nothing with a
journal, because the files keep fixed names in a folder that may hold other
files too (a Trainer checkpoint):

1. every new file is written whole under a temporary name and flushed;
2. the journal ``.elalora-commit.json`` (written atomically) lists them: this
   is the commit point;
3. each temporary file is renamed over its final name, files the new save
   drops are deleted, and the journal is deleted last.

Until step 2 completes no final name has changed: the folder holds the old
save. From then on the journal names a complete new save, and ``recover``
(run by every reader and writer before it touches the folder) finishes steps
3 that a killed writer left undone, so the folder holds the new save. Only a
reader that skips ``recover`` (transformers, PEFT) can see old and new files
side by side: after a writer was killed during step 3, until an elalora reader
or writer next opens the folder.

Every safetensors file of elalora's own format carries a SHA-256 digest of its
tensors (names, dtypes, shapes, bytes) in its metadata, and ``read_safetensors``
checks it: safetensors itself checks the header, not the data, so a flipped
byte in the data would otherwise load as a wrong weight. Its cost is measured
in benchmarks/RESULTS.md.
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


def _json_writer(data: Any) -> Callable[[str], None]:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")

    return write


DIGEST_KEY = "data_sha256"  # metadata key of the digest in elalora's own safetensors files


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order: what a safetensors file holds."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _safetensors_writer(tensors: dict, metadata: Optional[dict], digest: bool) -> Callable[[str], None]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if digest:
        metadata = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    return lambda tmp: save_file(tensors, tmp, metadata=metadata)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""
    _atomic_write(Path(path), _json_writer(data))


def read_json(path: str | Path) -> Any:
    """The data of a JSON file; ``ValueError`` naming the file if it is truncated or garbled."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err})") from None


# --------------------------------------------- saves of several files
JOURNAL = ".elalora-commit.json"


class SaveFiles:
    """The files of one save, collected and then committed together by ``commit_files``."""

    def __init__(self):
        self.writers: dict[str, Callable[[str], None]] = {}

    def json(self, name: str, data: Any) -> None:
        self.writers[name] = _json_writer(data)

    def safetensors(self, name: str, tensors: dict, metadata: Optional[dict] = None, *, digest: bool = True) -> None:
        """A safetensors file; with ``digest`` (elalora's own files) its metadata carries the data's digest."""
        self.writers[name] = _safetensors_writer(tensors, metadata, digest)


def commit_files(directory: str | Path, files: SaveFiles, remove: tuple[str, ...] = ()) -> None:
    """Replace the files of ``files`` in ``directory`` and delete ``remove``, all or nothing (see the module doc)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    for name in [*files.writers, JOURNAL]:  # temporary files of a writer killed before its commit point
        for stray in directory.glob(f".{name}.*.tmp"):
            stray.unlink(missing_ok=True)
    staged = {}
    try:
        for name, write in files.writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged[name] = Path(tmp).name
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        _sync_dir(directory)
        write_json_atomic(directory / JOURNAL, {"rename": staged, "remove": [n for n in remove if n not in staged]})
    except BaseException:
        for tmp in staged.values():
            (directory / tmp).unlink(missing_ok=True)
        raise
    _sync_dir(directory)
    recover(directory)


def recover(directory: str | Path) -> None:
    """Finish a save whose writer was stopped after its commit point (nothing to do otherwise)."""
    directory = Path(directory)
    journal = directory / JOURNAL
    if not journal.is_file():
        return
    plan = read_json(journal)
    for name, tmp in plan["rename"].items():
        try:
            os.replace(directory / tmp, directory / name)
        except FileNotFoundError:  # renamed already, by the writer or another reader
            pass
    for name in plan["remove"]:
        (directory / name).unlink(missing_ok=True)
    _sync_dir(directory)
    journal.unlink(missing_ok=True)
    _sync_dir(directory)


def _sync_dir(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable (POSIX; Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_safetensors(path: str | Path, *, digest: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file; ``ValueError`` naming the file if it is damaged.

    With ``digest`` (elalora's own files) the data must match the digest in the metadata.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if digest:
        check_digest(path, tensors, metadata.get(DIGEST_KEY))
    return tensors, metadata


def check_digest(path: str | Path, tensors: dict[str, torch.Tensor], expected: Optional[str]) -> None:
    """``ValueError`` naming ``path`` unless ``tensors`` have the digest ``expected``."""
    if expected is None:
        raise ValueError(f"{path} carries no digest of its data (damaged, or not written by this elalora)")
    if tensors_digest(tensors) != expected:
        raise ValueError(f"{path} is damaged: its data does not match the digest it was saved with")


# ------------------------------------------------- files of one save
def new_save_id() -> str:
    """A fresh id that every file of one save records, so that files of different saves are told apart."""
    return uuid.uuid4().hex


def same_save(json_meta: dict, tensors_meta: dict) -> bool:
    """Whether a JSON file and a safetensors file were written by the same save (both record its ``save_id``)."""
    return json_meta.get("save_id") is not None and tensors_meta.get("save_id") == json_meta["save_id"]
