"""Checkpoints and the Hugging Face Hub.

A checkpoint directory holds ``config.json`` (the zoo config), ``model.safetensors`` (or shards with
``model.safetensors.index.json``), ``tokenizer.json`` when the model has one, and a model card
``README.md``. Writes are atomic: everything goes to a temporary directory that is fsynced and renamed
at the end; a save replaces a checkpoint directory but refuses to replace one holding other files.
A push replaces the repo's checkpoint files in one commit and keeps its other files.

Loading never executes code: weights come from safetensors; a checkpoint that only has PyTorch ``.bin``
files is read with ``torch.load(weights_only=True)``, which refuses anything but tensors (the error
says whether a file was refused or is corrupt). fp8 zoo checkpoints are dequantised on load. A directory
or Hub repo holding a Hugging Face transformers checkpoint (``config.json`` with a ``model_type``) is
converted to zoo blocks by :mod:`zoo.convert`.

Hub transfers go through ``huggingface_hub`` (``snapshot_download``, ``HfApi.create_commit``), so
``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and revisions work as
for any Hub library.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import (CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData,
                             save_torch_state_dict, snapshot_download)
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

from zoo.config import ZooConfig

HUB_PREFIX = "hf-hub:"
_MTP_PREFIX = "mtp."  # multi-token prediction modules (zoo.blocks.mtp)
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "README.md", "tokenizer*", "*.model", "*.txt"]
_CHECKPOINT_FILES = {"config.json", "README.md", "tokenizer.json"}
_WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"  # single file or shard
                           r"|(model\.safetensors|pytorch_model\.bin)\.index\.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its model; the message names the file or tensors."""


# --------------------------------------------------------------------------- saving


def save_pretrained(model, path: str | os.PathLike, max_shard_size: str | int = "5GB",
                    extra_files: Mapping[str, str | bytes] | None = None, training: Mapping | None = None,
                    license: str = "apache-2.0", weights_format: str = "hp") -> Path:
    """Write ``config.json``, the safetensors weights (sharded with an index above ``max_shard_size``),
    ``extra_files`` (name -> content, e.g. ``tokenizer.json``) and a model card ``README.md`` to ``path``.

    ``training`` adds what the card should report of the run: ``steps``, ``val_loss``, ``corpus``.
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
    """
    if weights_format not in ("hp", "fp8"):
        raise ValueError(f"weights_format={weights_format!r}; choose 'hp' (high precision) or 'fp8'")
    path = Path(path)
    _check_replaceable(path, set(extra_files or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        config, state_dict = model.config.to_dict(), _untied_state_dict(model)
        if weights_format == "fp8":
            from zoo.fp8 import checkpoint as fp8_checkpoint

            state_dict = fp8_checkpoint.quantize_state_dict(state_dict, fp8_checkpoint.quantized_weight_names(model))
            config["quantization_config"] = fp8_checkpoint.QUANTIZATION_CONFIG
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_torch_state_dict(state_dict, staging, max_shard_size=max_shard_size)
        for name, content in (extra_files or {}).items():
            target = staging / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        (staging / "README.md").write_text(model_card(model, training, license))
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def model_card(model, training: Mapping | None = None, license: str = "apache-2.0") -> str:
    """A Hub model card: YAML metadata (``library_name: zoo``, block-family tags, license) and a body with
    the architecture, total and active parameter counts, and the training corpus, steps and validation loss."""
    config = model.config
    m = config.model
    training = dict(training or {})
    blocks = [m.layer_blocks(i) for i in range(m.n_layers)]
    mixers = sorted({mixer.type for mixer, _ in blocks})
    ffns = sorted({ffn.type for _, ffn in blocks})
    data = ModelCardData(library_name="zoo", license=license, pipeline_tag="text-generation",
                         tags=["zoo", *(f"mixer-{t}" for t in mixers), *(f"ffn-{t}" for t in ffns)])
    total, active = model.num_parameters(), model.num_parameters(active=True)

    def spec(block) -> str:
        options = {k: v for k, v in block.to_dict().items() if k != "type"}
        return f"`{block.type}` " + ", ".join(f"{k}={v}" for k, v in options.items())

    rows = [("vocab_size", m.vocab_size), ("d_model", m.d_model), ("n_layers", m.n_layers),
            ("max_seq_len", m.max_seq_len), ("tie_embeddings", m.tie_embeddings), ("norm", spec(m.norm)),
            ("mixer", spec(m.mixer)), ("ffn", spec(m.ffn))]
    rows += [(f"layer {i}", ", ".join(spec(b) for b in (o.mixer, o.ffn) if b is not None))
             for i, o in sorted(m.layers.items())]
    if m.mtp is not None:
        rows.append(("mtp", f"depth={m.mtp.depth}, heads={m.mtp.heads}, loss_weight={m.mtp.loss_weight} "
                            "(multi-token prediction; `zoo.from_pretrained(..., drop_mtp=True)` leaves it out)"))
    corpus = training.get("corpus", config.train.data.corpus)
    steps = training.get("steps")
    val_loss = training.get("val_loss")
    lines = [
        f"# {config.name or 'zoo model'}", "",
        "A decoder-only language model built with zoo from interchangeable blocks.", "",
        "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        f"Parameters: {total:,} total, {active:,} active per token.", "",
        "## Training", "",
        f"- corpus: `{corpus}`, tokenizer `{config.train.data.tokenizer}`, sequence length {config.train.data.seq_len}",
        f"- steps: {steps if steps is not None else 'unknown'}",
        f"- final validation loss: {f'{val_loss:.4f}' if val_loss is not None else 'unknown'}", "",
        "## Use", "", "```python", "import zoo", "", 'model = zoo.from_pretrained("<repo_id or path>")', "```", "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def push_to_hub(model, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload zoo model", revision: str | None = None,
                max_shard_size: str | int = "5GB", **save_kwargs):
    """Save ``model`` to a temporary directory and commit it to the Hub repo ``repo_id`` (created if
    missing). ``token`` defaults to ``HF_TOKEN`` / the saved login. Returns the ``CommitInfo``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "checkpoint", max_shard_size, **save_kwargs)
        return upload_checkpoint(folder, repo_id, private, token, commit_message, revision)


def upload_checkpoint(folder: str | os.PathLike, repo_id: str, private: bool | None = None,
                      token: str | None = None, commit_message: str = "Upload zoo model",
                      revision: str | None = None):
    """Commit a checkpoint directory written by :func:`save_pretrained` to the Hub repo ``repo_id``
    (created if missing); ``train.py`` calls this with the final export when ``hub.push`` is set.

    The push replaces the checkpoint in the repo exactly, in one commit: it adds the folder's files and
    deletes the repo's other top-level checkpoint files (older shards and index, ``pytorch_model*.bin``,
    a ``tokenizer.json`` the new checkpoint lacks), so that a pull never mixes two checkpoints. Other
    files (``.gitattributes``, a user's docs, anything in a subfolder) are kept. The commit names the
    head it was computed from as its parent, so a concurrent commit makes it fail instead of being undone."""
    folder = Path(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    head = api.repo_info(repo_id, revision=revision)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    stale = sorted(f.rfilename for f in head.siblings or []
                   if "/" not in f.rfilename and _is_checkpoint_file(f.rfilename) and f.rfilename not in files)
    operations = [*(CommitOperationDelete(name) for name in stale),
                  *(CommitOperationAdd(name, folder / name) for name in files)]
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision,
                             parent_commit=head.sha)


# --------------------------------------------------------------------------- loading


def from_pretrained(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                    token: str | None = None, cache_dir: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, drop_mtp: bool = False):
    """A :class:`zoo.ZooModel` from a local directory or a Hub repo id (``org/name``, ``revision`` a
    branch, tag or commit), holding a zoo checkpoint (fp8 weights are dequantised) or a transformers
    checkpoint of a supported ``model_type`` (see :mod:`zoo.convert`). ``dtype`` casts the weights; None
    keeps the checkpoint's. ``drop_mtp=True`` leaves out the multi-token prediction modules (``mtp.*``
    tensors, ``model.mtp``), so that an MTP checkpoint serves as a plain model (DeepSeek-V3 §2.2)."""
    directory = resolve_checkpoint(path_or_repo_id, revision, token=token, cache_dir=cache_dir)
    config, state_dict = read_checkpoint(directory)
    return load_model(config, state_dict, str(path_or_repo_id), dtype, drop_mtp=drop_mtp)


def load_pretrained_for(config: ZooConfig, revision: str | None = None, token: str | None = None,
                        drop_mtp: bool = False):
    """A model built from ``config`` with the weights of its ``hub.repo_id`` (a repo id or a local dir),
    read as :func:`from_pretrained` reads them; ``drop_mtp`` as there.

    The config may differ from the checkpoint's in anything that leaves the tensors' shapes alone;
    a shape mismatch names the tensors."""
    if config.hub.repo_id is None:
        raise ValueError(f"preset {config.name!r} has no hub.repo_id, so it has no pretrained weights")
    directory = resolve_checkpoint(config.hub.repo_id, revision, token=token)
    _, state_dict = read_checkpoint(directory)
    return load_model(config, state_dict, config.hub.repo_id, drop_mtp=drop_mtp)


def load_hub_model(name: str, overrides: Mapping | None = None, revision: str | None = None,
                   token: str | None = None, drop_mtp: bool = False):
    """``create_model("hf-hub:org/repo", ...)``: the repo's model (read as :func:`from_pretrained` reads
    it), with ``overrides`` applied to its zoo config; ``revision``, ``token`` and ``drop_mtp`` as there."""
    from zoo.config import load_config

    directory = resolve_checkpoint(name[len(HUB_PREFIX):], revision, token=token)
    config, state_dict = read_checkpoint(directory)
    if overrides:
        config = load_config(config, overrides)
    return load_model(config, state_dict, name, drop_mtp=drop_mtp)


def read_checkpoint(directory: Path) -> tuple[ZooConfig, dict[str, torch.Tensor]]:
    """The zoo config and state dict (zoo names, high precision) of a checkpoint directory: a
    transformers checkpoint (``config.json`` with a ``model_type``) is converted by :mod:`zoo.convert`;
    fp8 weights (``quantization_config``, DeepSeek-V3 layout) are dequantised by
    :func:`zoo.fp8.checkpoint.dequantize_state_dict`."""
    config = _read_json(directory / "config.json")
    if "model_type" in config:
        from zoo.convert import convert_checkpoint

        return convert_checkpoint(config, read_state_dict(directory), str(directory))
    quantization = config.pop("quantization_config", None)
    zoo_config, state_dict = ZooConfig.from_dict(config), read_state_dict(directory)
    if quantization is not None:
        from zoo.fp8.checkpoint import dequantize_state_dict

        state_dict = dequantize_state_dict(state_dict, quantization)
    return zoo_config, state_dict


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                       token: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory of a checkpoint: ``path_or_repo_id`` itself if it is a directory, else the
    Hub snapshot of that repo at ``revision`` (downloaded into the cache, or found there offline)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{str(path)!r} has no config.json, so it is not a checkpoint directory")
        return path
    repo_id = str(path_or_repo_id)
    if repo_id.startswith(HUB_PREFIX):
        repo_id = repo_id[len(HUB_PREFIX):]
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory {repo_id!r} does not exist (and it is no Hub repo id)")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                          allow_patterns=_DOWNLOAD_PATTERNS))
        if not any(snapshot.glob("*.safetensors")):  # old repos: PyTorch pickles, read with weights_only
            snapshot = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                              allow_patterns=[*_DOWNLOAD_PATTERNS, "*.bin"]))
    except LocalEntryNotFoundError as err:
        from huggingface_hub import constants

        where = cache_dir or constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"{repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
                                    f"{where} and HF_HUB_OFFLINE=1 forbids downloading it") from err
        raise FileNotFoundError(f"{repo_id!r} (revision {revision or 'main'}) could not be downloaded from "
                                f"{constants.ENDPOINT} and is not in the cache {where}: {err}") from err
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(f"Hub repo {repo_id!r} (revision {revision or 'main'}) has no config.json")
    return snapshot


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single file or index + shards) first, else
    PyTorch ``.bin`` files through ``torch.load(weights_only=True)``; never any other unpickling."""
    directory = Path(directory)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / index).is_file():
            shards = sorted(set(_read_json(directory / index)["weight_map"].values()))
        elif (directory / single).is_file():
            shards = [single]
        else:
            continue
        state_dict = {}
        for shard in shards:
            state_dict.update(_read_weights(directory / shard))
        return state_dict
    raise CheckpointError(f"{str(directory)!r} holds no weights: expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def load_model(config: ZooConfig, state_dict: dict[str, torch.Tensor], source: str,
               dtype: torch.dtype | None = None, drop_mtp: bool = False, mtp_init: bool = False):
    """Build ``config``'s model without initialising it and fill it from ``state_dict``; a missing,
    unexpected or wrongly shaped tensor raises :class:`CheckpointError` naming every such tensor.

    Multi-token prediction (``mtp.*`` tensors): ``drop_mtp=True`` loads without them (and sets
    ``config.model.mtp`` to None); ``mtp_init=True`` lets a checkpoint without them fill a config with
    ``model.mtp``, the MTP modules keeping their fresh initialisation (to train them on a plain model)."""
    from zoo.factory import build_model, build_skeleton

    if drop_mtp:
        config.model.mtp = None
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_MTP_PREFIX)}
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    grow_mtp = mtp_init and config.model.mtp is not None and not any(k.startswith(_MTP_PREFIX) for k in state_dict)
    model = build_skeleton(config)  # no initialisation: every tensor comes from the checkpoint
    persistent = set(model.state_dict())
    if grow_mtp or any(name not in persistent for name, _ in model.named_buffers()):
        model = build_model(config)  # fresh MTP modules, or derived buffers the checkpoint does not hold
    if grow_mtp:
        state_dict = {**{k: v for k, v in model.state_dict().items() if k.startswith(_MTP_PREFIX)}, **state_dict}
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.model.tie_embeddings:
        model.head.weight = model.embed.weight
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
            "mtp_init=True (zoo.hub.load_model) to start the MTP modules from a fresh initialisation")
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


# --------------------------------------------------------------------------- helpers


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"weights file {str(file)!r} listed in the checkpoint is missing")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as err:
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not readable JSON: {err}") from err


def _tied_keys(model) -> set[str]:
    return {"head.weight"} if model.config.model.tie_embeddings else set()


def _untied_state_dict(model) -> dict:
    """The state dict with each tied weight stored once (under its embedding's name)."""
    return {k: v for k, v in model.state_dict().items() if k not in _tied_keys(model)}


def _is_checkpoint_file(name: str) -> bool:
    """Whether a top-level file name is one :func:`save_pretrained` writes (or a weights file of an
    older checkpoint format), as opposed to a file a user put beside the checkpoint."""
    return name in _CHECKPOINT_FILES or _WEIGHTS_FILE.fullmatch(name) is not None


def _check_replaceable(path: Path, extra_names: set[str]) -> None:
    """Raise ``FileExistsError`` unless saving to ``path`` can replace it without losing a user's file."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"cannot save a checkpoint to {str(path)!r}: it exists and is not a directory")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if (path / "config.json").is_file():
        foreign = [e for e in entries if not (_is_checkpoint_file(e) or e in extra_names)]
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


def _replace_dir(staging: Path, path: Path) -> None:
    """Move the finished ``staging`` directory to ``path`` (replacing a checkpoint there). Every file and
    the directory are fsynced before the rename and the parent after it, so that after a power cut
    ``path`` holds the old checkpoint or the complete new one (or, cut between the two renames of a
    replacement, nothing, the old checkpoint being at ``.<name>.old-*``)."""
    for file in staging.iterdir():
        _fsync(file)
    _fsync(staging)
    if path.exists():
        retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.replace(path, retired)
        os.replace(staging, path)
        _fsync(path.parent)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, path)
        _fsync(path.parent)
