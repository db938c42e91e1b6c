"""Saving and loading zoo checkpoints: ``config.json`` (the model config and a format version), the
safetensors weights (sharded with an index above a size limit), ``tokenizer.json`` when the model has one,
and a model card ``README.md``.

Loading accepts the files every zoo version wrote: zoo 0.1's ``config.json`` held the whole run config
(``model``, ``train``, ``hub``); only its ``model`` section is read. A directory or Hub repo holding a
transformers checkpoint (``config.json`` with a ``model_type``) is converted by
:mod:`zoo.checkpoint.importers`; fp8 zoo checkpoints are dequantised.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import save_torch_state_dict

from zoo.adapters import add_adapter, has_adapter
from zoo.adapters.nf4 import dense_weight
from zoo.checkpoint.adapters import is_adapter_dir, load_adapter, load_adapter_state, save_adapter
from zoo.checkpoint.card import model_card
from zoo.checkpoint.files import check_replaceable, directory_version, read_json, read_state_dict, replace_dir
from zoo.checkpoint.hub import HUB_PREFIX, resolve_checkpoint, upload_checkpoint
from zoo.checkpoint.importers import convert_checkpoint
from zoo.errors import CheckpointError
from zoo.fp8 import checkpoint as fp8_checkpoint
from zoo.model import ModelConfig, ZooModel, build_skeleton, materialize
from zoo.model.memory import check_fits
from zoo.tokenizer import HFTokenizer

FORMAT_VERSION = 2  # of config.json: 2 holds {"format_version", "model"}; zoo 0.1 wrote the run config (1)
_READ_ATTEMPTS = 8  # of a checkpoint being replaced while read; backing off 10 ms doubling (2.5 s in all)
_MTP_PREFIX = "mtp."  # multi-token prediction modules (zoo.model.mtp)


def save_pretrained(model, path: str | os.PathLike, max_shard_size: str | int = "5GB",
                    extra_files: Mapping[str, str | bytes] | None = None, training: Mapping | None = None,
                    license: str = "apache-2.0", weights_format: str = "hp",
                    adapter_base: str | None = None) -> Path:
    """Write ``config.json``, the safetensors weights (sharded with an index above ``max_shard_size``),
    ``extra_files`` (name -> content, e.g. ``tokenizer.json``; ``model.tokenizer``'s is written when it has one
    and ``extra_files`` brings none) and a model card ``README.md`` to ``path``.

    ``config.json`` holds the model config under ``model`` and :data:`FORMAT_VERSION`; a run's own config
    may travel beside it as an extra file (``run_config.yaml``), never needed to load. ``training`` adds
    what the card should report of the run: ``name``, ``steps``, ``val_loss``, ``corpus``, ``tokenizer``,
    ``seq_len``.
    ``weights_format="fp8"`` stores the linear weights as e4m3 with per-128x128-block inverse scales
    (DeepSeek-V3 layout, :mod:`zoo.fp8.checkpoint`); the default ``"hp"`` keeps the model's dtype.
    Everything is written and fsynced in a hidden sibling directory ``.<name>.tmp-<random>`` that is
    renamed to ``path`` at the end, so a crash never leaves a half-written checkpoint at ``path``.

    ``path`` is replaced as a whole, so it must be new, empty, or a checkpoint directory (it has a
    ``config.json``) holding only checkpoint files: ``config.json``, ``README.md``, ``tokenizer.json``,
    the weights (``model*.safetensors``, ``pytorch_model*.bin``, their index) and the ``extra_files``
    names. Anything else there (a user's notes, a ``.git`` folder) makes it raise ``FileExistsError``
    naming those files before anything is written: they are never deleted, and never copied into a
    checkpoint they do not belong to. A hard kill can leave a ``.<name>.tmp-*`` directory behind (or,
    killed between the two renames of a replacement, the previous checkpoint as ``.<name>.old-*``); no
    later save or load reads either, and they can be deleted.

    A model with an adapter whose base is known (``model.adapter_base``, see :func:`zoo.add_adapter`) saves
    the adapter only (:func:`zoo.checkpoint.adapters.save_adapter`: ``adapter_config.json`` naming the base,
    ``adapter_model.safetensors``, the ``extra_files``); ``adapter_base`` overrides how it names the base (a
    path relative to ``path``, such as a training run's ``../base``). One without a known base saves
    everything, the config keeping ``model.adapter``.
    """
    if has_adapter(model) and getattr(model, "adapter_base", None) is not None:
        if weights_format != "hp":
            raise ValueError("an adapter is saved in its own precision: weights_format applies to full checkpoints")
        return save_adapter(model, path, extra_files, adapter_base)
    if weights_format not in ("hp", "fp8"):
        raise ValueError(f"weights_format={weights_format!r}; choose 'hp' (high precision) or 'fp8'")
    path = Path(path)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and "tokenizer.json" not in (extra_files or {}):
        extra_files = {**(extra_files or {}), "tokenizer.json": tokenizer.to_json()}
    check_replaceable(path, set(extra_files or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        config = {"format_version": FORMAT_VERSION, "model": model.config.to_dict()}
        state_dict = _untied_state_dict(model)
        if weights_format == "fp8":
            names = fp8_checkpoint.quantized_weight_names(model, tuple(model.config.fp8.skip))
            state_dict = fp8_checkpoint.quantize_state_dict(state_dict, names)
            config["quantization_config"] = fp8_checkpoint.QUANTIZATION_CONFIG
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_torch_state_dict(state_dict, staging, max_shard_size=max_shard_size)
        for name, content in (extra_files or {}).items():
            target = staging / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        (staging / "README.md").write_text(model_card(model, training, license))
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def push_to_hub(model, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload zoo model", revision: str | None = None,
                max_shard_size: str | int = "5GB", **save_kwargs):
    """Save ``model`` to a temporary directory and commit it to the Hub repo ``repo_id`` (created if
    missing). ``token`` defaults to ``HF_TOKEN`` / the saved login. Returns the ``CommitInfo``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "checkpoint", max_shard_size, **save_kwargs)
        return upload_checkpoint(folder, repo_id, private, token, commit_message, revision)


def from_pretrained(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                    token: str | None = None, cache_dir: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, drop_mtp: bool = False, base: str | None = None) -> ZooModel:
    """A :class:`zoo.ZooModel` from a local directory or a Hub repo id (``org/name``, ``revision`` a
    branch, tag or commit), holding a zoo checkpoint (fp8 weights are dequantised) or a transformers
    checkpoint of a supported ``model_type`` (see :mod:`zoo.checkpoint.importers`). ``dtype`` casts the weights; None
    keeps the checkpoint's. ``drop_mtp=True`` leaves out the multi-token prediction modules (``mtp.*``
    tensors, ``model.mtp``), so that an MTP checkpoint serves as a plain model (DeepSeek-V3 §2.2).

    An adapter directory or repo (``adapter_config.json``: zoo's, or a peft LoRA adapter of a Llama-family
    model, :mod:`zoo.checkpoint.peft`) loads the base it names (``base`` overrides that: a path or
    ``hf-hub:ORG/NAME@REVISION``) with the adapter added; ``dtype`` and ``drop_mtp`` apply to the base.
    ``model.tokenizer`` is the checkpoint's ``tokenizer.json`` (:class:`zoo.tokenizer.HFTokenizer`), None
    when it has none, so that ``model.generate_text`` works on any checkpoint that ships its tokenizer."""
    directory = resolve_checkpoint(path_or_repo_id, revision, token=token, cache_dir=cache_dir)
    if is_adapter_dir(directory):
        def load_base(name: str, base_revision: str | None) -> ZooModel:
            return from_pretrained(name, base_revision, token=token, cache_dir=cache_dir, dtype=dtype,
                                   drop_mtp=drop_mtp)

        return load_adapter(directory, load_base, base, str(path_or_repo_id))
    if base is not None:
        raise ValueError(f"base={base!r} applies to adapter checkpoints; {str(path_or_repo_id)!r} is a model")
    config, state_dict = read_checkpoint(directory)
    return _with_tokenizer(load_model(config, state_dict, str(path_or_repo_id), dtype, drop_mtp=drop_mtp), directory)


def load_pretrained(repo_id: str, config: ModelConfig, revision: str | None = None, token: str | None = None,
                    drop_mtp: bool = False) -> ZooModel:
    """A model built from ``config`` with the weights of ``repo_id`` (a Hub repo id or a local dir), read
    as :func:`from_pretrained` reads them; ``drop_mtp`` as there.

    The config may differ from the checkpoint's in anything that leaves the tensors' shapes alone;
    a shape mismatch names the tensors."""
    directory = resolve_checkpoint(repo_id, revision, token=token)
    _, state_dict = read_checkpoint(directory)
    return _with_tokenizer(load_model(config, state_dict, repo_id, drop_mtp=drop_mtp), directory)


def load_hub_model(name: str, overrides: Mapping | None = None, revision: str | None = None,
                   token: str | None = None, drop_mtp: bool = False) -> ZooModel:
    """``create_model("hf-hub:org/repo", ...)``: the repo's model (read as :func:`from_pretrained` reads
    it), with dotted ``model.*`` ``overrides`` applied to its config; ``revision``, ``token`` and
    ``drop_mtp`` as there."""
    directory = resolve_checkpoint(name[len(HUB_PREFIX):], revision, token=token)
    config, state_dict = read_checkpoint(directory)
    if overrides:
        config = config.with_overrides(overrides)
    return _with_tokenizer(load_model(config, state_dict, name, drop_mtp=drop_mtp), directory)


def read_tokenizer(directory: Path) -> HFTokenizer | None:
    """The tokenizer of a checkpoint directory (its ``tokenizer.json``), or None when it holds none. A
    tokenizer without an end-of-text token zoo knows is left out with a warning (the weights still load)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return HFTokenizer.from_file(path)
    except ValueError as err:
        warnings.warn(f"model loaded without its tokenizer: {err}", stacklevel=3)
        return None


def _with_tokenizer(model: ZooModel, directory: Path) -> ZooModel:
    """``model`` with ``model.tokenizer`` read from ``directory`` (None when it has no ``tokenizer.json``)."""
    model.tokenizer = read_tokenizer(directory)
    return model


def read_checkpoint(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and state dict (zoo names, high precision) of a checkpoint directory: a
    transformers checkpoint (``config.json`` with a ``model_type``) is converted by
    :mod:`zoo.checkpoint.importers`; fp8 weights (``quantization_config``, DeepSeek-V3 layout) are
    dequantised by :func:`zoo.fp8.checkpoint.dequantize_state_dict`.

    A save may replace the directory while it is read (a training run re-exporting it): the read is
    repeated until the directory's version (:func:`~zoo.checkpoint.files.directory_version`) is the same
    before and after it, so the result is the old checkpoint or the new one, never a mix of their files."""
    for attempt in range(_READ_ATTEMPTS):
        before = directory_version(directory)
        try:
            result = _read_checkpoint_once(directory)
        except (CheckpointError, OSError):
            if before is not None and directory_version(directory) == before:
                raise  # the checkpoint itself is bad, not replaced under us
            result = None
        if result is not None and before is not None and directory_version(directory) == before:
            return result
        time.sleep(0.01 * 2 ** attempt)
    raise CheckpointError(f"{str(directory)!r} changed or vanished each of the {_READ_ATTEMPTS} times it was read "
                          "(is something saving to it in a loop?); try again")


def _read_checkpoint_once(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = read_json(directory / "config.json")
    if "model_type" in config:
        return convert_checkpoint(config, read_state_dict(directory), str(directory))
    model_config = read_model_config(config, directory / "config.json")
    state_dict = read_state_dict(directory)
    quantization = config.get("quantization_config")
    if quantization is not None:
        state_dict = fp8_checkpoint.dequantize_state_dict(state_dict, quantization)
    return model_config, state_dict


def read_model_config(config: Mapping, source: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a zoo ``config.json``: format 2's ``model``, the ``model`` section of
    zoo 0.1's run config (its ``train`` and ``hub`` sections are not read, so renaming a training key never
    makes a published checkpoint unloadable), or a bare model section (``model.config.to_json()``)."""
    version = config.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{str(source)!r} has format_version {version!r}; this zoo reads versions 1 to "
                              f"{FORMAT_VERSION} (upgrade zoo to load it)")
    section = config.get("model", config)
    if not isinstance(section, Mapping):
        raise CheckpointError(f"{str(source)!r}: 'model' must be a mapping of model keys, got {section!r}")
    section = {key: value for key, value in section.items() if key not in ("format_version", "quantization_config")}
    return ModelConfig.from_dict(section)


def load_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str,
               dtype: torch.dtype | None = None, drop_mtp: bool = False, mtp_init: bool = False) -> ZooModel:
    """Build ``config``'s model on the meta device and fill it from ``state_dict``; a missing,
    unexpected or wrongly shaped tensor raises :class:`CheckpointError` naming every such tensor.

    The checkpoint's tensors are assigned, not copied; only what it does not hold (non-persistent buffers
    such as the MoE load counts, fresh MTP modules) is allocated, on the checkpoint's device, and initialised
    (:func:`zoo.model.build.materialize`).

    Multi-token prediction (``mtp.*`` tensors): ``drop_mtp=True`` loads without them (into a copy of
    ``config`` without ``mtp``); ``mtp_init=True`` lets a checkpoint without them fill a config with
    ``model.mtp``, the MTP modules keeping their fresh initialisation (to train them on a plain model).

    A config with ``model.adapter`` (a full checkpoint of an adapted model) loads the base tensors into the
    model without it, then adds the adapter and fills it from the rest."""
    if config.adapter is not None:
        base_keys = set(build_skeleton(replace(config, adapter=None)).state_dict())
        model = load_model(replace(config, adapter=None), {k: v for k, v in state_dict.items() if k in base_keys},
                           source, dtype, drop_mtp, mtp_init)
        add_adapter(model, config.adapter)
        tensors = {k: v for k, v in state_dict.items() if k not in base_keys}
        load_adapter_state(model, tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}, source)
        return model
    if drop_mtp:
        config = config.without_mtp()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_MTP_PREFIX)}
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    grow_mtp = mtp_init and config.mtp is not None and not any(k.startswith(_MTP_PREFIX) for k in state_dict)
    check_fits(config)  # an override that grew the model is refused before its skeleton is built
    model = build_skeleton(config)
    fresh = {k: v for k, v in model.state_dict().items() if grow_mtp and k.startswith(_MTP_PREFIX)}  # meta: shapes
    check_state_dict(model, {**fresh, **state_dict}, source)
    device = next(iter(state_dict.values())).device if state_dict else torch.device("cpu")
    materialize(model, set(state_dict) | _tied_keys(model), device)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    return model


def check_state_dict(model, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming every tensor of ``state_dict`` that does not fit ``model``:
    missing, unexpected or wrongly shaped, and a trained output head that a tied model would discard."""
    if (_tied_keys(model) and "head.weight" in state_dict and "embed.weight" in state_dict
            and not torch.equal(state_dict["head.weight"], state_dict["embed.weight"])):
        raise CheckpointError(
            f"checkpoint {source!r} holds an output head 'head.weight' that differs from 'embed.weight', but the "
            "config sets model.tie_embeddings=true, which would discard the trained head: set "
            "model.tie_embeddings to false to load it")
    expected = {k: v for k, v in model.state_dict().items() if k not in _tied_keys(model)}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - _tied_keys(model))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    mtp_missing = [k for k in missing if k.startswith(_MTP_PREFIX)]
    mtp_unexpected = [k for k in unexpected if k.startswith(_MTP_PREFIX)]
    if mtp_missing and mtp_missing == missing and not unexpected and not mismatched:
        raise CheckpointError(
            f"checkpoint {source!r} has no multi-token prediction weights, but the config sets model.mtp: "
            f"missing tensors {mtp_missing}. Set model.mtp to null to load it as a plain model, or pass "
            "mtp_init=True (zoo.checkpoint.pretrained.load_model) to start the MTP modules from a fresh initialisation")
    if mtp_unexpected and mtp_unexpected == unexpected and not missing and not mismatched:
        raise CheckpointError(
            f"checkpoint {source!r} holds multi-token prediction weights that the config has no model.mtp for: "
            f"unexpected tensors {mtp_unexpected}. Load with drop_mtp=True (zoo.from_pretrained) to serve it "
            "as a plain model, or keep the checkpoint's model.mtp in the config")
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise CheckpointError(f"checkpoint {source!r} does not fit its config: " + ", ".join(problems))


def _tied_keys(model) -> set[str]:
    return {"head.weight"} if model.config.tie_embeddings else set()


def _untied_state_dict(model) -> dict:
    """The state dict with each tied weight stored once (under its embedding's name)."""
    return {k: dense_weight(v) for k, v in model.state_dict().items() if k not in _tied_keys(model)}
