"""Checkpoint files: reading weights safely, and writing a checkpoint directory atomically.

Weights come from safetensors; a checkpoint that only has PyTorch ``.bin`` files is read with
``torch.load(weights_only=True)``, which refuses anything but tensors (the error says whether a file was
refused or is corrupt). Nothing here ever executes pickled code. A directory is written in a hidden
sibling, fsynced, and renamed over the target, so a reader sees the old checkpoint or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import json
import os
import pickle
import pickletools
import re
import shutil
import sys
import time
import uuid
import zipfile
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from zoo.errors import CheckpointError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # an adapter checkpoint
CHECKPOINT_FILES = {"config.json", "README.md", "tokenizer.json", "run_config.yaml", ADAPTER_CONFIG, ADAPTER_WEIGHTS}
_WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"  # single file or shard
                           r"|(model\.safetensors|pytorch_model\.bin)\.index\.json")


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single file or index + shards) first, else
    PyTorch ``.bin`` files through ``torch.load(weights_only=True)``; never any other unpickling."""
    directory = Path(directory)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / index).is_file():
            shards = _index_shards(directory, index)
        elif (directory / single).is_file():
            shards = [directory / single]
        else:
            continue
        state_dict = {}
        for shard in shards:
            state_dict.update(_read_weights(shard))
        return state_dict
    raise CheckpointError(f"{str(directory)!r} holds no weights: expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def _index_shards(directory: Path, index: str) -> list[Path]:
    """The shard files an index's ``weight_map`` names, each confined to ``directory``: a name that is
    absolute, climbs out with ``..`` or passes through a symlinked folder leading elsewhere is refused.
    Only the folders are resolved, not the file itself, because a Hub snapshot's files are symlinks into
    the cache's blob store."""
    path = directory / index
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{str(path)!r} is not a weights index: expected 'weight_map', a mapping of tensor "
                              f"names to shard file names, got {type(weight_map).__name__}")
    root = directory.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        relative = PurePosixPath(name)
        shard = directory / relative
        if (not name or relative.is_absolute() or ".." in relative.parts or "\\" in name
                or not shard.parent.resolve().is_relative_to(root)):
            raise CheckpointError(f"{str(path)!r} names the shard {name!r}, which is not a file inside "
                                  f"{str(directory)!r}; refused")
        shards.append(shard)
    return shards


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"weights file {str(file)!r} listed in the checkpoint is missing")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # RuntimeError: cannot open it
            if not file.is_file():
                raise CheckpointError(f"weights file {str(file)!r} disappeared while it was read") from err
            raise CheckpointError(f"{str(file)!r} is not a readable safetensors file "
                                  f"(truncated or corrupt?): {err}") from err
    zipped = zipfile.is_zipfile(file)  # torch.save's format since torch 1.6; older files are bare pickles
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)  # mmap needs the zip format
    except pickle.UnpicklingError:  # refused by the weights-only unpickler, or not a pickle at all
        try:
            names = _pickled_globals(file, zipped)
        except (ValueError, zipfile.BadZipFile, OSError) as err:
            raise _unreadable(file, err) from err
        foreign = sorted(n for n in names if not n.startswith(("torch.", "collections.OrderedDict")))
        listed = f" ({', '.join(foreign)})" if foreign else ""
        raise CheckpointError(f"refused to load {str(file)!r}: it contains non-tensor objects{listed}; pickled code "
                              "is never executed (convert it to safetensors where you trust its source)") from None
    except Exception as err:  # a damaged zip, a pickle that ends early, storages cut short
        raise _unreadable(file, err) from err
    if not (isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise CheckpointError(f"{str(file)!r} holds a {type(loaded).__name__}, not a state dict of tensors by name")
    return loaded


def _unreadable(file: Path, err: Exception) -> CheckpointError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return CheckpointError(f"corrupt or truncated file {str(file)!r}: it cannot be read as a torch.save tensor "
                           f"checkpoint ({type(err).__name__}{': ' + detail if detail else ''})")


def _pickled_globals(file: Path, zipped: bool) -> set[str]:
    """The globals (``module.name``) that the pickles of a torch.save file refer to, found by parsing
    their opcodes with :mod:`pickletools` (which executes nothing). ``ValueError`` when they are not
    well-formed pickles: the file is corrupt, truncated or no pickle at all."""
    with contextlib.ExitStack() as stack:
        if zipped:
            archive = stack.enter_context(zipfile.ZipFile(file))
            records = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
            if not records:
                raise ValueError("the zip archive holds no data.pkl")
            stream, count = stack.enter_context(archive.open(records[0])), 1
        else:  # magic number, protocol, system info, the object, storage keys; then raw storage bytes
            stream, count = stack.enter_context(open(file, "rb")), 5
        names: set[str] = set()
        for i in range(count):
            if i and not stream.peek(1):  # a bare pickle, not torch.save's sequence, ends after the first
                break
            strings: list[str] = []
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    names.add(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(".".join(strings[-2:]))
                if isinstance(arg, str):
                    strings.append(arg)
        return names


def read_json(path: Path) -> dict:
    """The JSON object (a dict) in ``path``; CheckpointError naming the file for anything else."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object")
    return data


def is_checkpoint_file(name: str) -> bool:
    """Whether a top-level file name is one :func:`save_pretrained` writes (or a weights file of an
    older checkpoint format), as opposed to a file a user put beside the checkpoint."""
    return name in CHECKPOINT_FILES or _WEIGHTS_FILE.fullmatch(name) is not None


def check_replaceable(path: Path, extra_names: set[str]) -> None:
    """Raise ``FileExistsError`` unless saving to ``path`` can replace it without losing a user's file."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"cannot save a checkpoint to {str(path)!r}: it exists and is not a directory")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file():
        foreign = [e for e in entries if not (is_checkpoint_file(e) or e in extra_names)]
        why = "holds files that are not part of a zoo checkpoint"
    else:
        foreign = entries
        why = "is not a checkpoint directory (it has no config.json) and is not empty"
    if foreign:
        listed = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise FileExistsError(
            f"refusing to save a checkpoint to {str(path)!r}: saving replaces the whole directory, and it {why}: "
            f"{listed}. Nothing was written; save to a new directory, or move those files out")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(staging: Path, path: Path) -> None:
    """Move the finished ``staging`` directory to ``path`` (replacing a checkpoint there). Every file and
    the directory are fsynced before the rename and the parent after it, so that after a power cut
    ``path`` holds the old checkpoint or the complete new one. A replacement swaps the two directories in
    one step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), so ``path`` never disappears;
    elsewhere it takes two renames, between which ``path`` is briefly missing (a power cut there leaves the
    old checkpoint at ``.<name>.old-*``)."""
    for file in staging.iterdir():
        _fsync(file)
    _fsync(staging)
    if not path.exists():
        os.replace(staging, path)
    elif _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # now the old checkpoint
    else:
        retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync(path.parent)


_RENAME_EXCHANGE = 2  # renameat2 flag: swap the two paths atomically
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux 3.15+ on most filesystems); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


def being_replaced(path: Path) -> bool:
    """Whether a save is between the two renames of a replacement of ``path`` (a ``.<name>.old-*`` sibling)."""
    return any(path.parent.glob(f".{glob.escape(path.name)}.old-*"))


def wait_for_replacement(path: Path, attempts: int = 8) -> None:
    """Wait (10 ms doubling, 2.5 s at most) while ``path/config.json`` is missing because a save is between
    the two renames of a replacement."""
    for attempt in range(attempts):
        if (path / "config.json").is_file() or not being_replaced(path):
            return
        time.sleep(0.01 * 2 ** attempt)


def directory_version(path: Path) -> tuple[int, ...] | None:
    """What changes whenever a save replaces the checkpoint directory ``path`` (its inode, and its
    ``config.json``'s inode and modification time), or None while it is missing."""
    try:
        directory, config = os.stat(path), os.stat(path / "config.json")
    except FileNotFoundError:
        return None
    return directory.st_ino, config.st_ino, config.st_mtime_ns
