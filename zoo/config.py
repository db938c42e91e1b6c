"""Typed configs: dataclasses loaded from YAML/JSON, validated before any tensor exists.

A config file has three sections, ``model``, ``train`` and ``hub`` (see DESIGN §3). Blocks are
chosen by name from the registry: ``mixer: {type: attention, n_heads: 8}`` becomes a
:class:`BlockSpec` whose ``options`` is the registered block's own config dataclass.

Every problem raises :class:`ConfigError` naming the dotted key, the bad value and what is allowed.
Dotted overrides (``model.n_layers=2``, ``train.optimizer.lr=1e-3``) apply to the raw mapping before
typing, so they are validated exactly like the file itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from zoo import registry


class ConfigError(ValueError):
    """A config key, value or combination that cannot be built; the message names the key."""


# --------------------------------------------------------------------------- schema


@dataclass
class BlockSpec:
    """A registered block of some kind, chosen by ``type``, with its options dataclass."""

    type: str
    options: Any

    def to_dict(self) -> dict:
        return {"type": self.type, **_to_plain(self.options)}


def _block(kind: str, type_: str) -> Any:
    """A dataclass field holding a BlockSpec of ``kind`` whose default is the block ``type_``."""

    def default() -> BlockSpec:
        return BlockSpec(type_, registry.lookup(kind, type_).config())

    return field(default_factory=default, metadata={"kind": kind})


@dataclass
class LayerOverride:
    """Blocks of one layer that differ from the model's defaults (``model.layers: {i: {...}}``)."""

    mixer: BlockSpec | None = field(default=None, metadata={"kind": "mixer"})
    ffn: BlockSpec | None = field(default=None, metadata={"kind": "ffn"})


@dataclass
class FP8Config:
    """``model.fp8``: FP8 GEMMs for the eligible linear layers (``zoo.fp8``); off by default."""

    recipe: Literal["none", "tensorwise", "rowwise", "blockwise"] = "none"
    backend: Literal["auto", "emulate", "scaled_mm"] = "auto"  # auto: _scaled_mm on fp8 GPUs, else emulate
    weight_grad_high_precision: bool = False  # weight-gradient GEMM in float32 (torchao rowwise_with_gw_hp)
    skip: list[str] = field(default_factory=list)  # extra fnmatch patterns of linears kept in high precision

    def validate(self) -> None:
        if self.backend == "scaled_mm" and self.recipe == "blockwise":
            raise ConfigError("backend 'scaled_mm' takes tensorwise or rowwise scales; recipe 'blockwise' is "
                              "emulated per tile (use backend auto or emulate)")
        for pattern in self.skip:
            if not pattern:
                raise ConfigError(f"skip: patterns must be non-empty module-name globs, got {self.skip!r}")


@dataclass
class MTPConfig:
    """``model.mtp``: multi-token prediction modules (DeepSeek-V3 §2.2; Gloeckle et al. 2024 §2).

    ``depth`` modules predict tokens ``i+2 .. i+depth+1``; ``heads: sequential`` chains them as in
    DeepSeek-V3 (each sees the previous depth's hidden state and the next token's embedding),
    ``parallel`` gives each its own one-block head on the shared trunk (Gloeckle et al.). The modules'
    block uses ``mixer`` / ``ffn`` when set, else the model's ``model.mixer`` / ``model.ffn``.
    """

    depth: int = 1
    loss_weight: float = 0.3  # lambda in DeepSeek-V3 Eq. 25 (0.3 for its first 10T tokens)
    heads: Literal["sequential", "parallel"] = "sequential"
    mixer: BlockSpec | None = field(default=None, metadata={"kind": "mixer"})
    ffn: BlockSpec | None = field(default=None, metadata={"kind": "ffn"})

    def validate(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"depth must be an integer >= 1, got {self.depth} (omit model.mtp or set it "
                              "to null for no multi-token prediction)")
        if self.loss_weight < 0:
            raise ConfigError(f"loss_weight must be >= 0, got {self.loss_weight}")


@dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer (256 + specials for bytes)
    d_model: int = 256
    n_layers: int = 4
    max_seq_len: int = 512
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm: BlockSpec = _block("norm", "rmsnorm")
    mixer: BlockSpec = _block("mixer", "attention")
    ffn: BlockSpec = _block("ffn", "mlp")
    layers: dict[int, LayerOverride] = field(default_factory=dict)
    fp8: FP8Config = field(default_factory=FP8Config)
    mtp: MTPConfig | None = None  # multi-token prediction (zoo.blocks.mtp); None: off

    def layer_blocks(self, index: int) -> tuple[BlockSpec, BlockSpec]:
        """The (mixer, ffn) specs of layer ``index``, per-layer overrides applied."""
        override = self.layers.get(index, LayerOverride())
        return override.mixer or self.mixer, override.ffn or self.ffn


@dataclass
class DataConfig:
    corpus: str = "python-stdlib"  # embedded corpus name, a text file, a folder or a glob
    tokenizer: str = "bytes"  # bytes | bpe | path to a tokenizer.json
    seq_len: int = 256
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.02
    split_seed: int = 0  # seeds the document-level train/validation split
    num_workers: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 3.0e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    """Passed through to ``lightning.Trainer``."""

    accelerator: str = "auto"
    devices: int | str | list[int] = 1  # a count, -1 (all), "auto", or device indices
    num_nodes: int = 1
    strategy: str = "auto"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer keyword arguments


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    batch_size: int = 16
    max_steps: int = 2000
    val_check_interval: int = 200
    val_batches: int = 20
    checkpoint_every: int = 200
    log_every: int = 10  # optimizer steps between train/* metric rows
    sample_tokens: int = 200  # length of the sample generated at the end (0: none)
    out_dir: str | None = None
    resume: bool | str = False
    skip_nonfinite: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: str | int = "bf16-mixed"  # a lightning.Trainer precision (LIGHTNING_PRECISIONS)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class HubConfig:
    repo_id: str | None = None
    push: bool = False


@dataclass
class ZooConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    name: str | None = None  # the preset this config came from, if any

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ZooConfig":
        config = _typed(cls, _complete_layer_overrides(_deep_copy(data)), "")
        validate(config)
        return config

    @classmethod
    def from_json(cls, text: str) -> "ZooConfig":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- Lightning's values

# What ``lightning.Trainer(precision=...)`` accepts (Lightning 2.x; tests check it against Lightning).
LIGHTNING_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true", "64-true",
                        "transformer-engine", "transformer-engine-float16", "bf16", "16", "32", "64", 16, 32, 64)
# Strategy and accelerator names built into Lightning, accepted without importing it (which takes
# seconds); any other name is looked up in Lightning's registries, where users may register their own.
_BUILTIN_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "single_device")
_BUILTIN_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

# lightning.Trainer arguments that zoo.training.train() sets itself, with where their value comes
# from: ``train.trainer.extra`` must not repeat them.
TRAINER_ARGS_SET_BY_ZOO = {
    "accelerator": "train.trainer.accelerator", "devices": "train.trainer.devices",
    "num_nodes": "train.trainer.num_nodes", "strategy": "train.trainer.strategy",
    "accumulate_grad_batches": "train.trainer.accumulate_grad_batches",
    "gradient_clip_val": "train.trainer.gradient_clip_val", "precision": "train.precision",
    "max_steps": "train.max_steps", "val_check_interval": "train.val_check_interval",
    "log_every_n_steps": "train.log_every", "default_root_dir": "train.out_dir",
    "check_val_every_n_epoch": "zoo, to validate every train.val_check_interval steps",
    "num_sanity_val_steps": "zoo, to skip the sanity validation",
    "logger": "zoo, for metrics.csv and TensorBoard in train.out_dir",
    "callbacks": "zoo; add yours with zoo.training.train(config, callbacks=[...])",
    "enable_checkpointing": "zoo, which checkpoints every train.checkpoint_every steps",
    "use_distributed_sampler": "zoo, whose batch sampler shards ranks and resumes",
}
# Keys written under train.trainer that zoo's config holds elsewhere, for the unknown-key message.
_TRAINER_KEYS_ELSEWHERE = {f"train.trainer.{arg}": where for arg, where in TRAINER_ARGS_SET_BY_ZOO.items()
                           if where.startswith("train.") and where != f"train.trainer.{arg}"}


# --------------------------------------------------------------------------- loading


def presets_dir() -> Path:
    """Where the preset YAMLs live: beside the package in a checkout, inside it once installed."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "zoo_configs", package.parent / "zoo_configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("zoo_configs/ was not found beside or inside the zoo package")


def list_presets(pattern: str = "*") -> list[str]:
    """Sorted preset names (YAML stems in ``zoo_configs/``) matching a glob pattern."""
    import fnmatch

    names = sorted(p.stem for p in presets_dir().glob("*.yaml"))
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def load_config(name_or_path: str | Path | Mapping | ZooConfig,
                overrides: Sequence[str] | Mapping[str, Any] | None = None) -> ZooConfig:
    """A validated :class:`ZooConfig` from a preset name, a YAML/JSON path or a mapping.

    ``overrides`` is a list of ``"dotted.key=value"`` strings (values parsed as YAML scalars, as on
    ``train.py``'s command line) or a mapping ``{"dotted.key": value}``.
    """
    raw, name = _read_raw(name_or_path)
    apply_overrides(raw, overrides)
    if name is not None and raw.get("name") is None:
        raw["name"] = name
    return ZooConfig.from_dict(raw)


def _read_raw(source) -> tuple[dict, str | None]:
    if isinstance(source, ZooConfig):
        return source.to_dict(), source.name
    if isinstance(source, Mapping):
        return _deep_copy(source), None
    path = Path(source)
    if not path.exists() and path.suffix not in (".yaml", ".yml", ".json"):  # a preset name ("retnet-1.3b")
        path = presets_dir() / f"{source}.yaml"
        if not path.exists():
            close = difflib.get_close_matches(str(source), list_presets(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown preset {str(source)!r}{hint} Presets: {', '.join(list_presets())}")
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model/train/hub, got {type(raw).__name__}")
    return raw, path.stem


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """``["a.b=1", ...]`` or ``{"a.b": 1}`` as ``[("a.b", 1), ...]``; string values parse as YAML scalars."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    items = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        items.append((key.strip(), yaml.safe_load(value) if value.strip() else None))
    return items


def apply_overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any] | None) -> dict:
    """Set dotted keys in a raw config mapping in place (``model.layers.0.ffn.type=mlp``)."""
    for key, value in parse_overrides(overrides):
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            part = _existing_key(node, part)
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        last = _existing_key(node, parts[-1])
        current = node.get(last)
        # A mapping merges over the block it overrides, unless it names another type (which starts
        # from that block's defaults, as per-layer overrides do).
        if (isinstance(value, Mapping) and isinstance(current, dict)
                and value.get("type", current.get("type")) == current.get("type")):
            node[last] = {**current, **value}
        else:
            node[last] = value
    return raw


def _complete_layer_overrides(raw: dict) -> dict:
    """Merge each partial per-layer block over the model's default block of the same type.

    ``layers: {0: {ffn: {d_hidden: 1024}}}`` keeps the default FFN's type and other options; an
    override naming another ``type`` starts from that block's own defaults instead.
    """
    model = raw.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("layers"), dict):
        return raw
    defaults = {"mixer": "attention", "ffn": "mlp"}
    for override in model["layers"].values():
        if not isinstance(override, dict):
            continue
        for part, default_type in defaults.items():
            base = model.get(part, {"type": default_type})
            base = {"type": base} if isinstance(base, str) else base
            spec = override.get(part)
            spec = {"type": spec} if isinstance(spec, str) else spec
            if isinstance(spec, dict) and isinstance(base, dict) and spec.get("type", base.get("type")) == base.get("type"):
                override[part] = {**base, **spec}
    return raw


def _existing_key(node: dict, part: str):
    # "layers.0" must reach the YAML int key 0.
    if part.isdigit() and int(part) in node:
        return int(part)
    return part


# --------------------------------------------------------------------------- typing


def _typed(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a raw mapping, checking every key and value."""
    where = path or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            elsewhere = _TRAINER_KEYS_ELSEWHERE.get(_join(path, key))
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = (f"; it is set by {elsewhere}." if elsewhere else
                    f"; did you mean {' or '.join(close)}?" if close else "")
            raise ConfigError(f"unknown key {_join(path, key)!r}{hint} Valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(path, name), f.metadata.get("kind"))
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str, kind: str | None = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, path, kind)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: {value!r} is not one of the allowed types "
                          f"({' | '.join(_type_name(a) for a in args)})")
    if tp is BlockSpec:
        return _block_spec(kind, value, path)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _typed(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        coerced = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            if key_type is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)  # JSON object keys are strings
            out[_coerce(key_type, k, f"{path} key")] = _coerce(value_type, v, _join(path, k))
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: the config schema uses an unsupported type {tp!r}")


def _block_spec(kind: str, value: Any, path: str) -> BlockSpec:
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, Mapping) or "type" not in value:
        raise ConfigError(f"{path}: expected a mapping with a 'type' key naming a {kind} block "
                          f"({', '.join(registry.available(kind))}), got {value!r}")
    name = value["type"]
    entry = registry.lookup(kind, name)
    if entry is None:
        names = registry.available(kind)
        close = difflib.get_close_matches(str(name), names, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"{path}.type: unknown {kind} block {name!r}{hint}; "
                          f"registered {kind} blocks: {', '.join(names)}")
    options = _typed(entry.config, {k: v for k, v in value.items() if k != "type"}, path)
    return BlockSpec(name, options)


# --------------------------------------------------------------------------- validation


def require_positive(config: Any, *names: str) -> None:
    """Raise ConfigError naming each of ``names`` (fields of ``config``) that is set and not > 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def validate(config: ZooConfig) -> None:
    """Cross-key checks that typing alone cannot make; errors name the conflicting keys."""
    model = config.model
    _prefixed("model", require_positive, model, "vocab_size", "d_model", "n_layers", "max_seq_len", "init_std")
    for index in model.layers:
        if not 0 <= index < model.n_layers:
            raise ConfigError(f"model.layers.{index}: layer index out of range for model.n_layers={model.n_layers}")
    specs = [("model.norm", model.norm), ("model.mixer", model.mixer), ("model.ffn", model.ffn)]
    for index, override in sorted(model.layers.items()):
        specs += [(f"model.layers.{index}.{part}", getattr(override, part)) for part in ("mixer", "ffn")]
    if model.mtp is not None:
        _prefixed("model.mtp", model.mtp.validate)
        specs += [(f"model.mtp.{part}", getattr(model.mtp, part)) for part in ("mixer", "ffn")]
    for path, spec in specs:
        check = getattr(spec.options, "validate", None) if spec is not None else None
        if check is not None:
            _prefixed(path, check, model)
    _prefixed("model.fp8", model.fp8.validate)
    _validate_train(config.train)
    if config.hub.push and not config.hub.repo_id:
        raise ConfigError("hub.push=true needs hub.repo_id (the Hub repo to push to, e.g. org/name)")


def _validate_train(train: TrainConfig) -> None:
    _prefixed("train", require_positive, train, "batch_size", "max_steps", "val_check_interval",
              "checkpoint_every", "val_batches", "log_every")
    data = train.data
    _prefixed("train.data", require_positive, data, "seq_len")
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"train.data.val_fraction must be in (0, 1), got {data.val_fraction}")
    if data.tokenizer not in ("bytes", "bpe") and not data.tokenizer.endswith(".json"):
        raise ConfigError(f"train.data.tokenizer: {data.tokenizer!r} is not allowed; use bytes, bpe, or the "
                          "path of a tokenizer.json file")
    if data.bpe_vocab_size <= 257:
        raise ConfigError(f"train.data.bpe_vocab_size must exceed 257 (the 256 byte symbols and "
                          f"<|endoftext|>, plus at least one merge), got {data.bpe_vocab_size}")
    optimizer = train.optimizer
    _prefixed("train.optimizer", require_positive, optimizer, "lr", "eps")
    if optimizer.weight_decay < 0:
        raise ConfigError(f"train.optimizer.weight_decay must be >= 0, got {optimizer.weight_decay}")
    if not all(0.0 <= beta < 1.0 for beta in optimizer.betas):
        raise ConfigError(f"train.optimizer.betas: each must be in [0, 1), got {list(optimizer.betas)}")
    if train.schedule.warmup_steps < 0:
        raise ConfigError(f"train.schedule.warmup_steps must be >= 0, got {train.schedule.warmup_steps}")
    if not 0.0 <= train.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.schedule.min_lr_ratio must be in [0, 1], got {train.schedule.min_lr_ratio}")
    if train.precision not in LIGHTNING_PRECISIONS:
        close = difflib.get_close_matches(str(train.precision), [str(p) for p in LIGHTNING_PRECISIONS], n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"train.precision: {train.precision!r} is not a Lightning precision{hint}; choose one "
                          f"of {', '.join(map(str, LIGHTNING_PRECISIONS))}")
    _validate_trainer(train.trainer)


def _validate_trainer(trainer: TrainerConfig) -> None:
    _prefixed("train.trainer", require_positive, trainer, "accumulate_grad_batches", "num_nodes")
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val < 0:
        raise ConfigError(f"train.trainer.gradient_clip_val must be >= 0 or null (no clipping), "
                          f"got {trainer.gradient_clip_val}")
    if not _valid_devices(trainer.devices):
        raise ConfigError(f"train.trainer.devices: {trainer.devices!r} is not allowed; use a positive device "
                          "count, -1 (all devices), 'auto', or a list of distinct device indices such as [0, 1]")
    if trainer.strategy.lower() not in _BUILTIN_STRATEGIES:
        from lightning.pytorch.strategies import StrategyRegistry

        _check_registered("train.trainer.strategy", trainer.strategy.lower(), "strategy",
                          ["auto", *StrategyRegistry.available_strategies()])
    if trainer.accelerator not in _BUILTIN_ACCELERATORS:
        from lightning.pytorch.accelerators import AcceleratorRegistry

        _check_registered("train.trainer.accelerator", trainer.accelerator, "accelerator",
                          ["auto", "gpu", *AcceleratorRegistry.available_accelerators()])
    collisions = [key for key in trainer.extra if key in TRAINER_ARGS_SET_BY_ZOO]
    if collisions:
        sources = "; ".join(f"{key} is set by {TRAINER_ARGS_SET_BY_ZOO[key]}" for key in collisions)
        raise ConfigError(f"train.trainer.extra: {', '.join(collisions)} repeat lightning.Trainer arguments that "
                          f"zoo already passes ({sources}); remove them from extra")


def _valid_devices(devices: int | str | list[int]) -> bool:
    """What ``lightning.Trainer(devices=...)`` accepts: a count > 0, -1, 'auto', or device indices."""
    if isinstance(devices, int):
        return devices > 0 or devices == -1
    if isinstance(devices, list):
        return bool(devices) and all(d >= 0 for d in devices) and len(set(devices)) == len(devices)
    text = devices.strip()
    if text == "auto" or text == "-1" or (text.isdigit() and int(text) > 0):
        return True
    indices = [part.strip() for part in text.split(",") if part.strip()]  # "0,1" or "1,"
    return "," in text and bool(indices) and all(i.isdigit() for i in indices) and len(set(indices)) == len(indices)


def _check_registered(path: str, name: str, kind: str, names: list[str]) -> None:
    if name not in names:
        close = difflib.get_close_matches(name, names, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"{path}: {name!r} is not a Lightning {kind}{hint}; registered: {', '.join(sorted(names))}")


def _prefixed(path: str, check, *args) -> None:
    try:
        check(*args)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- helpers


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, BlockSpec):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_deep_copy(v) for v in obj]
    return obj


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)
