"""``train.init_from``: start a run from trained weights instead of a fresh initialisation.

The source is a zoo checkpoint directory (``runs/<preset>/<time>/final``, or the run directory itself, whose
``final/`` is taken), an adapter directory (``adapter_config.json``: zoo's, or peft's; its base is loaded and
the adapter merged into it), a transformers checkpoint of a family zoo imports
(:mod:`zoo.checkpoint.importers`), or ``hf-hub:ORG/NAME[@REVISION]`` for any of them on the Hub. At config
load (:func:`resolve_init_from`) the run's ``model`` section becomes the checkpoint's, with the config's own
``model`` keys applied over it as overrides: those that keep every tensor's shape (dropout,
``bias_update_rate``, ``freeze_router``, an adapter) are allowed, and so is a larger ``vocab_size`` (the
vocabulary grows, :func:`grow_vocabulary`; a run's ``run_config.yaml`` records the grown size, so it loads
back); one that changes another shape is a :class:`~zoo.errors.ConfigError` naming the key, the checkpoint's
value and the override. The checkpoint's ``tokenizer.json`` (with its ``tokenizer_config.json``; an
adapter's own, else its base's) becomes ``train.data.tokenizer``, so the data is tokenised as the model was
trained. At training :func:`load_initial_model` reads the weights (merging an adapter the checkpoint holds),
grows them to the run's vocabulary (the chat markers SFT and DPO add), and the run adds its own
``model.adapter`` over the result, training the added token rows too (:func:`with_trainable_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from zoo.adapters import has_adapter, merge_adapter
from zoo.checkpoint.adapters import adapter_base, is_adapter_dir
from zoo.checkpoint.files import read_json
from zoo.checkpoint.hub import HUB_PREFIX, resolve_checkpoint
from zoo.checkpoint.pretrained import from_pretrained, load_model, read_checkpoint, read_model_config
from zoo.errors import CheckpointError, ConfigError
from zoo.model import ModelConfig, build_skeleton
from zoo.schema import BlockSpec, deep_copy

TOKENIZER_FILE = "tokenizer.json"
# Model keys that never change a tensor's shape but that shape comparison cannot see (built separately).
_NOT_IN_SKELETON = ("adapter",)


def checkpoint_directory(source: str) -> Path:
    """The local directory of ``train.init_from``: a checkpoint or adapter dir, a run dir's ``final/``, or a
    Hub snapshot (``hf-hub:ORG/NAME@REV`` downloads into the Hugging Face cache, or finds it there offline)."""
    if source.startswith(HUB_PREFIX):
        repo, _, revision = source[len(HUB_PREFIX):].partition("@")
        try:
            return Path(resolve_checkpoint(repo, revision or None))
        except Exception as err:  # a missing repo or revision, no network: what the Hub client said
            raise ConfigError(f"train.init_from: {source!r} could not be fetched: {err}") from err
    path = Path(source).expanduser()
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file() or is_adapter_dir(candidate):
            return candidate
    raise ConfigError(f"train.init_from: {source!r} is neither a checkpoint directory (config.json), an adapter "
                      "directory (adapter_config.json), a run directory with either in final/, nor "
                      "hf-hub:ORG/NAME[@REVISION]")


def base_directory(directory: Path) -> Path:
    """The checkpoint directory of the base an adapter directory names (itself for a model checkpoint)."""
    if not is_adapter_dir(directory):
        return directory
    try:
        return checkpoint_directory(adapter_base(directory))
    except CheckpointError as err:
        raise ConfigError(f"train.init_from: {err}") from err


def checkpoint_model_section(directory: Path) -> dict:
    """The plain ``model`` section of the checkpoint in ``directory`` (a transformers one converted; an
    adapter's base's, without the adapter)."""
    directory = base_directory(directory)
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
    grown = merged.get("vocab_size")  # a larger vocabulary is grown by load_initial_model, not a shape error
    if isinstance(grown, int) and not isinstance(grown, bool) and grown > stored["vocab_size"]:
        stored = {**stored, "vocab_size": grown}
    _check_shapes(stored, merged, str(source))
    raw = {**raw, "model": merged}
    tokenizer = next((d / TOKENIZER_FILE for d in (directory, base_directory(directory))
                      if (d / TOKENIZER_FILE).is_file()), None)
    if tokenizer is not None:
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


@dataclass
class InitialModel:
    """What :func:`load_initial_model` gives a run."""

    model: nn.Module  # the checkpoint's weights in the run's model, without its adapter, grown
    changed: bool  # differs from the checkpoint's base (grown or merged): an adapter over it needs it saved
    added_tokens: list[int]  # the ids the vocabulary grew by


def load_initial_model(config: ModelConfig, source: str, vocab_size: int) -> InitialModel:
    """The model of ``config`` (the resolved run config's ``model``) without its adapter, with the weights of
    ``train.init_from``, grown to ``vocab_size`` ids (and ``config.vocab_size``; :func:`grow_vocabulary`).

    An adapter the checkpoint holds (an adapter directory, or a full checkpoint keeping ``model.adapter``) is
    merged into its weights (:func:`zoo.adapters.merge_adapter`): the SFT model a DPO run starts from is its
    base, and its reference."""
    checkpoint = from_pretrained(checkpoint_directory(source))
    merged = has_adapter(checkpoint)
    if merged:
        merge_adapter(checkpoint)
    stored_vocab = checkpoint.config.vocab_size
    base_config = replace(config, adapter=None, vocab_size=stored_vocab)
    model = load_model(base_config, checkpoint.state_dict(), source)
    grow_vocabulary(model, max(vocab_size, config.vocab_size or 0))
    added = list(range(stored_vocab, model.config.vocab_size))
    return InitialModel(model, merged or bool(added), added)


def init_from_base(source: str) -> str:
    """How an adapter trained over the unchanged checkpoint of ``train.init_from`` names it: the absolute path
    of its directory (the run's working directory may not be the loader's), or the ``hf-hub:`` name."""
    return source if source.startswith(HUB_PREFIX) else str(checkpoint_directory(source).resolve())


def with_trainable_tokens(spec: BlockSpec, token_ids: list[int]) -> BlockSpec:
    """``spec`` (``model.adapter``) also training the embedding and output rows of ``token_ids`` when the
    adapter has the ``trainable_tokens`` option (:mod:`zoo.adapters.tokens`); unchanged otherwise."""
    if not token_ids or "trainable_tokens" not in {f.name for f in fields(spec.options)}:
        return spec
    ids = sorted(set(spec.options.trainable_tokens) | set(token_ids))
    return replace(spec, options=replace(spec.options, trainable_tokens=ids))


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
