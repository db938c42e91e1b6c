"""``train.init_from``: start a run from trained weights instead of a fresh initialisation.

The source is a zoo checkpoint directory (``runs/<preset>/<time>/final``, or the run directory itself, whose
``final/`` is taken), a transformers checkpoint of a family zoo imports (:mod:`zoo.checkpoint.importers`), or
``hf-hub:ORG/NAME[@REVISION]`` for either on the Hub. At config load (:func:`resolve_init_from`) the run's
``model`` section becomes the checkpoint's, with the config's own ``model`` keys applied over it as
overrides: those that keep every tensor's shape (dropout, ``bias_update_rate``, ``freeze_router``, an
adapter) are allowed, one that changes a shape is a :class:`~zoo.errors.ConfigError` naming the key, the
checkpoint's value and the override. The checkpoint's ``tokenizer.json`` (with its ``tokenizer_config.json``)
becomes ``train.data.tokenizer``, so the data is tokenised as the model was trained. At training
:func:`load_initial_model` reads the weights (merging an adapter the checkpoint holds), :func:`grow_vocabulary`
adds rows for tokens the run's tokenizer added (the chat markers of SFT and DPO), and the run adds its
own ``model.adapter`` over the result.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from zoo.adapters import adapter_state_dict, add_adapter, merge_adapter
from zoo.checkpoint.files import read_json
from zoo.checkpoint.hub import HUB_PREFIX, resolve_checkpoint
from zoo.checkpoint.pretrained import load_model, read_checkpoint, read_model_config
from zoo.errors import CheckpointError, ConfigError
from zoo.model import ModelConfig, build_skeleton
from zoo.schema import deep_copy

TOKENIZER_FILE = "tokenizer.json"
# Model keys that never change a tensor's shape but that shape comparison cannot see (built separately).
_NOT_IN_SKELETON = ("adapter",)


def checkpoint_directory(source: str) -> Path:
    """The local directory of ``train.init_from``: a checkpoint dir, a run dir's ``final/``, or a Hub snapshot
    (``hf-hub:ORG/NAME@REV`` downloads into the Hugging Face cache, or finds it there offline)."""
    if source.startswith(HUB_PREFIX):
        repo, _, revision = source[len(HUB_PREFIX):].partition("@")
        try:
            return Path(resolve_checkpoint(repo, revision or None))
        except Exception as err:  # a missing repo or revision, no network: what the Hub client said
            raise ConfigError(f"train.init_from: {source!r} could not be fetched: {err}") from err
    path = Path(source).expanduser()
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"train.init_from: {source!r} is neither a checkpoint directory (with config.json), a run "
                      "directory with final/config.json, nor hf-hub:ORG/NAME[@REVISION]")


def checkpoint_model_section(directory: Path) -> dict:
    """The plain ``model`` section of the checkpoint in ``directory`` (a transformers one converted)."""
    try:
        config = read_json(directory / "config.json")
        if "model_type" in config:
            return read_checkpoint(directory)[0].to_dict()
        return read_model_config(config, directory / "config.json").to_dict()
    except (CheckpointError, ConfigError) as err:
        raise ConfigError(f"train.init_from: {err}") from err


def resolve_init_from(raw: dict) -> dict:
    """A raw run config with ``train.init_from`` resolved (module docstring); unchanged without it."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    source = train.get("init_from")
    if not source:
        return raw
    directory = checkpoint_directory(str(source))
    stored = checkpoint_model_section(directory)
    stored.pop("adapter", None)  # an adapter the checkpoint holds is merged into its weights (load_initial_model)
    overrides = raw.get("model") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"model: expected a mapping of overrides of the checkpoint's model, got {overrides!r}")
    merged = _merge(stored, overrides)
    _check_shapes(stored, merged, str(source))
    raw = {**raw, "model": merged}
    tokenizer = directory / TOKENIZER_FILE
    if tokenizer.is_file():
        data = dict(train.get("data") or {})
        given = data.get("tokenizer")
        if given not in (None, str(tokenizer)):
            raise ConfigError(f"train.data.tokenizer={given!r} conflicts with train.init_from={source!r}, whose "
                              f"tokenizer ({tokenizer}) the model was trained with; remove train.data.tokenizer")
        raw["train"] = {**train, "data": {**data, "tokenizer": str(tokenizer)}}
    return raw


def _merge(base: dict, overrides: dict) -> dict:
    """``overrides`` applied over ``base`` key by key; a block naming another ``type`` replaces it whole."""
    out = deep_copy(base)
    for key, value in overrides.items():
        current = out.get(key)
        if isinstance(value, dict) and isinstance(current, dict) and value.get("type", current.get("type")) == current.get("type"):
            out[key] = _merge(current, value)
        else:
            out[key] = deep_copy(value)
    return out


def _tensor_shapes(section: dict) -> dict[str, tuple]:
    section = {k: v for k, v in section.items() if k not in _NOT_IN_SKELETON}
    model = build_skeleton(ModelConfig.from_dict(section))  # on the meta device: no memory
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}  # adapter-free: no adapter tensors


def _leaves(section, prefix: str = "model") -> dict[str, object]:
    if isinstance(section, dict):
        return {k: v for key, value in section.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}
    return {prefix: section}


def _check_shapes(stored: dict, merged: dict, source: str) -> None:
    """ConfigError naming each override that changes a tensor shape of the checkpoint's model."""
    expected = _tensor_shapes(stored)
    if _tensor_shapes(merged) == expected:
        return
    old, new = _leaves(stored), _leaves(merged)
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
               and not key.startswith(tuple(f"model.{k}" for k in _NOT_IN_SKELETON))]
    culprits = []
    for key in changed:  # one override at a time: which of them change a shape
        alone = _merge(stored, _nested(key, new.get(key)))
        try:
            if _tensor_shapes(alone) != expected:
                culprits.append(key)
        except ConfigError:
            culprits.append(key)  # invalid without the others: report it too
    listed = "; ".join(f"{key}: checkpoint {old.get(key)!r}, override {new.get(key)!r}" for key in culprits or changed)
    raise ConfigError(f"train.init_from={source!r}: model overrides that change the checkpoint's tensor shapes "
                      f"cannot load its weights ({listed}); remove them (overrides that keep the shapes, such as "
                      "dropout, bias_update_rate, freeze_router or an adapter, are allowed)")


def _nested(dotted: str, value) -> dict:
    parts = dotted.split(".")[1:]
    out: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def load_initial_model(config: ModelConfig, source: str, vocab_size: int) -> tuple[nn.Module, bool]:
    """``(model, changed)``: the model of ``config`` (the resolved run config's ``model``) without its adapter,
    with the weights of ``train.init_from``, grown to ``vocab_size`` ids (:func:`grow_vocabulary`).

    An adapter the checkpoint holds is merged into its weights (:func:`zoo.adapters.merge_adapter`): the SFT
    model a DPO run starts from is its base, and its reference. ``changed`` says whether the result differs
    from the checkpoint's base (grown or merged): an adapter trained over it then needs it saved to name it."""
    stored, state_dict = read_checkpoint(checkpoint_directory(source))
    base_config = replace(config, adapter=None)
    base_names = set(build_skeleton(base_config).state_dict())
    model = load_model(base_config, {k: v for k, v in state_dict.items() if k in base_names}, source)
    changed = stored.adapter is not None
    if changed:
        add_adapter(model, stored.adapter)
        adapter_tensors = {k: v for k, v in state_dict.items() if k not in base_names}
        missing = sorted(set(adapter_state_dict(model)) - set(adapter_tensors))
        if missing:
            raise CheckpointError(f"checkpoint {source!r} names adapter {stored.adapter.type!r} but lacks its "
                                  f"tensors {missing[:5]}")
        model.load_state_dict(adapter_tensors, strict=False)
        merge_adapter(model)
    changed |= vocab_size > model.config.vocab_size
    grow_vocabulary(model, vocab_size)
    return model, changed


def grow_vocabulary(model: nn.Module, vocab_size: int) -> nn.Module:
    """Give ``model`` ``vocab_size`` embedding (and untied output) rows, in place; returns it.

    New rows are the mean of the existing ones (Hewitt 2021, "Initializing New Word Embeddings for
    Pretrained Language Models": a new token then starts with the average prediction, not a random one
    that dominates the softmax; transformers' ``resize_token_embeddings`` does the same by default).
    Vocabulary the model already has is left alone."""
    old = model.config.vocab_size
    if vocab_size <= old:
        return model
    embed = model.embed.weight.detach()
    rows = embed.mean(0, keepdim=True).expand(vocab_size - old, -1)
    model.embed.weight = nn.Parameter(torch.cat([embed, rows]), requires_grad=model.embed.weight.requires_grad)
    model.embed.num_embeddings = vocab_size
    if not model.config.tie_embeddings:
        head = model.head.weight.detach()
        grown = torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - old, -1)])
        model.head.weight = nn.Parameter(grown, requires_grad=model.head.weight.requires_grad)
        model.head.out_features = vocab_size
    model.config = replace(model.config, vocab_size=vocab_size)
    model.tie_weights()
    return model
