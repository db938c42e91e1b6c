"""Adapter checkpoints: the adapter alone, beside a base it names (as ``peft`` stores LoRA adapters).

A directory holds ``adapter_config.json`` (``format_version``, the adapter spec ``adapter`` as
``model.adapter`` takes it, and ``base_model``: a local path or ``hf-hub:ORG/NAME[@REVISION]``) and
``adapter_model.safetensors`` (the adapter parameters only, by their names in the adapted model), plus any
extra files (``tokenizer.json``). A ``peft`` LoRA adapter directory (``adapter_config.json`` with
``peft_type``) is read through :mod:`zoo.checkpoint.peft`. Loading builds the base, adds the adapter and
fills it; a base that cannot be found is a :class:`CheckpointError` saying how to name it. A relative local
base is looked up beside the adapter directory first (``../base``: a training run's ``final/`` names the
``base/`` saved beside it, so the run directory can move), then relative to the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from zoo.adapters import add_adapter, adapter_spec, adapter_state_dict
from zoo.checkpoint import peft
from zoo.checkpoint.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_replaceable, read_json, replace_dir
from zoo.checkpoint.hub import HUB_PREFIX
from zoo.errors import CheckpointError, ConfigError
from zoo.schema import BlockSpec

ADAPTER_FORMAT_VERSION = 1
BaseLoader = Callable[[str, "str | None"], torch.nn.Module]  # (path or repo id, revision) -> base model


def is_adapter_dir(directory: Path) -> bool:
    """Whether ``directory`` holds an adapter checkpoint (zoo's or peft's) rather than a model."""
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file()


def split_base(base: str) -> tuple[str, str | None]:
    """``"hf-hub:ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")``; a local path -> ``(path, None)``."""
    if base.startswith(HUB_PREFIX):
        repo, _, revision = base[len(HUB_PREFIX):].partition("@")
        return repo, revision or None
    return base, None


def save_adapter(model, path: str | os.PathLike, extra_files: Mapping[str, str | bytes] | None = None,
                 base_model: str | None = None) -> Path:
    """Write ``model``'s adapter (config and parameters, not the base) to the directory ``path``, atomically
    as :func:`zoo.checkpoint.pretrained.save_pretrained` writes checkpoints. ``adapter_config.json`` names
    the base as ``base_model`` gives it (a path relative to ``path``, or any name ``model.adapter_base``
    takes), by default ``model.adapter_base``."""
    path = Path(path)
    check_replaceable(path, set(extra_files or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        config = {"format_version": ADAPTER_FORMAT_VERSION, "adapter": model.config.adapter.to_dict(),
                  "base_model": base_model or model.adapter_base}
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        tensors = {k: v.contiguous().clone() for k, v in adapter_state_dict(model).items()}
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        for name, content in (extra_files or {}).items():
            target = staging / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_adapter_config(directory: Path, source: str | None = None) -> tuple[BlockSpec, str | None]:
    """``(adapter spec, base it names or None)`` of the adapter checkpoint in ``directory``."""
    source = source or str(directory)
    config = read_json(directory / ADAPTER_CONFIG)
    if "peft_type" in config:
        return peft.adapter_spec(config, source), peft.base_name(config)
    version = config.get("format_version")
    if version != ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"{source!r}: adapter format_version {version!r}; this zoo reads "
                              f"{ADAPTER_FORMAT_VERSION} (upgrade zoo to load it)")
    try:
        spec = adapter_spec(config.get("adapter"))
    except ConfigError as err:
        raise CheckpointError(f"{source!r}: {err}") from err
    return spec, config.get("base_model")


def adapter_base(directory: Path, base: str | None = None, source: str | None = None) -> str:
    """The base of the adapter in ``directory``: ``base`` when given, else the one it names; a relative local
    path resolved beside the adapter when it exists there (module docstring)."""
    source = source or str(directory)
    base = base or read_adapter_config(directory, source)[1]
    if not base:
        raise CheckpointError(f"adapter {source!r} names no base model: pass base='PATH' or "
                              "base='hf-hub:ORG/NAME@REVISION' to zoo.from_pretrained")
    where = Path(base).expanduser()
    if not base.startswith(HUB_PREFIX) and not where.is_absolute() and (directory / where).exists():
        return str((directory / where).resolve())
    return base


def load_adapter(directory: Path, load_base: BaseLoader, base: str | None = None, source: str | None = None):
    """The base named by the adapter in ``directory`` (or ``base``, which overrides it), loaded by
    ``load_base``, with the adapter added and filled."""
    source = source or str(directory)
    config = read_json(directory / ADAPTER_CONFIG)
    spec = read_adapter_config(directory, source)[0]
    base = adapter_base(directory, base, source)
    try:
        model = load_base(*split_base(base))
    except (FileNotFoundError, CheckpointError, OSError) as err:
        raise CheckpointError(f"adapter {source!r}: its base model {base!r} cannot be loaded ({err}); pass "
                              "base='PATH' or base='hf-hub:ORG/NAME@REVISION' to zoo.from_pretrained") from err
    if not hasattr(model, "config") or not hasattr(model.config, "adapter"):
        raise CheckpointError(f"adapter {source!r}: its base {base!r} is not a zoo model")
    add_adapter(model, spec, base=base)
    tensors = load_file(directory / ADAPTER_WEIGHTS) if (directory / ADAPTER_WEIGHTS).is_file() else None
    if tensors is None:
        raise CheckpointError(f"adapter {source!r} has no {ADAPTER_WEIGHTS}")
    if "peft_type" in config:
        tensors = peft.to_zoo_tensors(tensors, model, source)
    load_adapter_state(model, tensors, source)
    return model


def load_adapter_state(model, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``'s adapter parameters; every missing, unexpected or wrongly shaped one is
    named in a :class:`CheckpointError`."""
    expected = adapter_state_dict(model)
    problems = []
    if missing := sorted(set(expected) - set(tensors)):
        problems.append(f"missing tensors {missing}")
    if unexpected := sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected tensors {unexpected}")
    if mismatched := [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                      if k in tensors and tensors[k].shape != v.shape]:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise CheckpointError(f"adapter {source!r} does not fit its base model: " + ", ".join(problems))
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])
