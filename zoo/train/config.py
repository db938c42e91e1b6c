"""The run config: a config file's three sections, ``model`` (:class:`~zoo.model.ModelConfig`), ``train``
and ``hub``, typed and validated before any tensor exists (:mod:`zoo.schema` does the typing).

Presets are the YAML files of ``zoo_configs/``; :func:`load_config` reads a preset name, a YAML/JSON path or
a mapping, with dotted overrides (``model.n_layers=2``, ``train.optimizer.lr=1e-3``) applied before typing;
with ``train.init_from`` its ``model`` keys override the checkpoint's (:mod:`zoo.train.init_from`).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

import yaml

from zoo.errors import ConfigError, prefixed, require_positive
from zoo.model.config import ModelConfig, complete_layer_overrides, validate_model
from zoo.schema import BlockSpec, apply_overrides, block_field, deep_copy, to_plain, typed
from zoo.train.init_from import resolve_init_from


# --------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    format: Literal["text", "chat", "preference"] = "text"  # text: corpus windows; chat/preference: records
    path: str | None = None  # chat/preference: a JSONL file; None: the embedded stdlib set (zoo.train.chat_data)
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

    KEYS_ELSEWHERE: ClassVar[dict[str, str]] = {}  # filled below from TRAINER_ARGS_SET_BY_ZOO

    accelerator: str = "auto"
    devices: int | str | list[int] = 1  # a count, -1 (all), "auto", or device indices
    num_nodes: int = 1
    strategy: str = "auto"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer keyword arguments


@dataclass
class ParallelConfig:
    """Scale-out beyond data parallelism, under Lightning's ``ModelParallelStrategy``
    (:mod:`zoo.train.parallel`): selected when ``expert_parallel > 1`` or ``fsdp``."""

    expert_parallel: int = 1  # ranks that split each MoE layer's experts (the ep dimension of the mesh)
    fsdp: bool = False  # FSDP2 (fully_shard) of the non-expert weights over all ranks

    @property
    def enabled(self) -> bool:
        return self.expert_parallel > 1 or self.fsdp


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
    resume: bool | str = False  # true: continue out_dir's (or the latest default run's) last.ckpt; or a path
    overwrite: bool = False  # start afresh in an out_dir holding another run, deleting its checkpoint and metrics
    skip_nonfinite: bool = False  # skip a step whose loss or gradients are not finite, instead of stopping
    max_skipped_fraction: float = 0.1  # skip_nonfinite: stop once more than this share of steps (and >1) is skipped
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: str | int = "auto"  # a lightning.Trainer precision (LIGHTNING_PRECISIONS), or auto: bf16-mixed
    #                                where the hardware has native bf16, else 32-true (zoo.train.precision)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # expert parallelism and FSDP2
    # Training-only transformations of each decoder block (zoo.train.block_wrappers); they change no result.
    activation_checkpointing: Literal["none", "full"] = "none"  # full: recompute each block's activations in backward
    compile: bool = False  # torch.compile each decoder block
    objective: BlockSpec = block_field("objective", "causal_lm")  # what a training step optimises
    init_from: str | None = None  # a checkpoint to start from: a path or hf-hub:ORG/NAME[@REV] (zoo.train.init_from)


@dataclass
class HubConfig:
    repo_id: str | None = None
    push: bool = False


@dataclass
class ZooConfig:
    """A whole run: the model, how to train it, where to publish it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    name: str | None = None  # the preset this config came from, if any

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ZooConfig":
        data = deep_copy(data)
        if isinstance(data, dict):
            complete_layer_overrides(data.get("model"))
        config = typed(cls, data)
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

# lightning.Trainer arguments that zoo.train.run.train() sets itself, with where their value comes
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
    "callbacks": "zoo; add yours with zoo.train.run.train(config, callbacks=[...])",
    "enable_checkpointing": "zoo, which checkpoints every train.checkpoint_every steps",
    "use_distributed_sampler": "zoo, whose batch sampler shards ranks and resumes",
}
# Keys written under train.trainer that zoo's config holds elsewhere, for the unknown-key message.
TrainerConfig.KEYS_ELSEWHERE.update({arg: where for arg, where in TRAINER_ARGS_SET_BY_ZOO.items()
                                     if where.startswith("train.") and where != f"train.trainer.{arg}"})


# --------------------------------------------------------------------------- loading


def presets_dir() -> Path:
    """Where the preset YAMLs live: beside the package in a checkout, inside it once installed."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "zoo_configs", package.parent / "zoo_configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("zoo_configs/ was not found beside or inside the zoo package")


def list_presets(pattern: str = "*") -> list[str]:
    """Sorted preset names (YAML stems in ``zoo_configs/``) matching a glob pattern."""
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
    return ZooConfig.from_dict(resolve_init_from(raw))


def _read_raw(source) -> tuple[dict, str | None]:
    if isinstance(source, ZooConfig):
        return source.to_dict(), source.name
    if isinstance(source, Mapping):
        return deep_copy(source), None
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


# --------------------------------------------------------------------------- validation


def validate(config: ZooConfig) -> None:
    """Cross-key checks that typing alone cannot make; errors name the conflicting keys."""
    validate_model(config.model)
    _validate_train(config.train)
    _validate_parallel(config)
    if config.hub.push and not config.hub.repo_id:
        raise ConfigError("hub.push=true needs hub.repo_id (the Hub repo to push to, e.g. org/name)")


def _validate_train(train: TrainConfig) -> None:
    prefixed("train", require_positive, train, "batch_size", "max_steps", "val_check_interval",
              "checkpoint_every", "val_batches", "log_every")
    data = train.data
    prefixed("train.data", require_positive, data, "seq_len")
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"train.data.val_fraction must be in (0, 1), got {data.val_fraction}")
    if data.tokenizer not in ("bytes", "bpe") and not data.tokenizer.endswith(".json"):
        raise ConfigError(f"train.data.tokenizer: {data.tokenizer!r} is not allowed; use bytes, bpe, or the "
                          "path of a tokenizer.json file")
    if data.format == "text" and data.path is not None:
        raise ConfigError(f"train.data.path={data.path!r} is for train.data.format chat or preference (a JSONL "
                          "file); format text reads train.data.corpus")
    if data.path is not None and not Path(data.path).expanduser().is_file():
        raise ConfigError(f"train.data.path: {data.path!r} is not an existing JSONL file")
    if data.bpe_vocab_size <= 257:
        raise ConfigError(f"train.data.bpe_vocab_size must exceed 257 (the 256 byte symbols and "
                          f"<|endoftext|>, plus at least one merge), got {data.bpe_vocab_size}")
    optimizer = train.optimizer
    prefixed("train.optimizer", require_positive, optimizer, "lr", "eps")
    if optimizer.weight_decay < 0:
        raise ConfigError(f"train.optimizer.weight_decay must be >= 0, got {optimizer.weight_decay}")
    if not all(0.0 <= beta < 1.0 for beta in optimizer.betas):
        raise ConfigError(f"train.optimizer.betas: each must be in [0, 1), got {list(optimizer.betas)}")
    if train.schedule.warmup_steps < 0:
        raise ConfigError(f"train.schedule.warmup_steps must be >= 0, got {train.schedule.warmup_steps}")
    if not 0.0 <= train.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.schedule.min_lr_ratio must be in [0, 1], got {train.schedule.min_lr_ratio}")
    if train.precision not in ("auto", *LIGHTNING_PRECISIONS):
        close = difflib.get_close_matches(str(train.precision), ["auto", *map(str, LIGHTNING_PRECISIONS)], n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"train.precision: {train.precision!r} is not a Lightning precision{hint}; choose auto "
                          f"or one of {', '.join(map(str, LIGHTNING_PRECISIONS))}")
    if not 0.0 <= train.max_skipped_fraction <= 1.0:
        raise ConfigError(f"train.max_skipped_fraction must be in [0, 1], got {train.max_skipped_fraction}")
    if train.overwrite and train.resume is not False:
        raise ConfigError(f"train.overwrite=true and train.resume={train.resume!r} contradict each other: "
                          "resume continues the run in train.out_dir, overwrite replaces it")
    _validate_trainer(train.trainer)


def _validate_trainer(trainer: TrainerConfig) -> None:
    prefixed("train.trainer", require_positive, trainer, "accumulate_grad_batches", "num_nodes")
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


def _validate_parallel(config: ZooConfig) -> None:
    """``train.parallel``: the (dp, ep) mesh must tile the world size (known here when ``devices`` is a count
    or a list) and every MoE layer's experts must split evenly over the ``expert_parallel`` ranks."""
    parallel, trainer, model = config.train.parallel, config.train.trainer, config.model
    ep = parallel.expert_parallel
    prefixed("train.parallel", require_positive, parallel, "expert_parallel")
    if not parallel.enabled:
        return
    if trainer.strategy.lower() != "auto":
        raise ConfigError(f"train.parallel (expert_parallel={ep}, fsdp={parallel.fsdp}) runs under Lightning's "
                          f"ModelParallelStrategy, which zoo builds itself; train.trainer.strategy must be auto, "
                          f"got {trainer.strategy!r}")
    world = world_size(trainer)
    if world is not None and world % ep:
        raise ConfigError(f"train.parallel.expert_parallel={ep} does not divide the world size {world} "
                          f"(train.trainer.devices={trainer.devices!r} x train.trainer.num_nodes={trainer.num_nodes}): "
                          f"the (dp, ep) device mesh needs dp x expert_parallel = world size")
    if ep > 1 and model.fp8.recipe != "none":
        raise ConfigError(f"train.parallel.expert_parallel={ep} with model.fp8.recipe={model.fp8.recipe!r}: the FP8 "
                          "experts do not run expert-parallel yet; use expert_parallel=1 or "
                          "model.fp8.recipe=none")
    specs = [model.layer_blocks(i)[1] for i in range(model.n_layers)]
    if model.mtp is not None:
        specs.append(model.mtp.ffn or model.ffn)
    for spec in specs:
        n_experts = getattr(spec.options, "n_experts", None)
        if ep > 1 and n_experts is not None and n_experts % ep:
            raise ConfigError(f"train.parallel.expert_parallel={ep} does not divide the n_experts={n_experts} of an "
                              f"ffn of type {spec.type!r}: each expert-parallel rank holds n_experts / "
                              f"expert_parallel whole experts")


def world_size(trainer: TrainerConfig) -> int | None:
    """Processes in the run, ``devices x num_nodes``, or None where the devices are found at start
    (``auto``, ``-1``)."""
    devices = trainer.devices
    if isinstance(devices, str):
        text = devices.strip()
        devices = int(text) if text.isdigit() else [p for p in text.split(",") if p.strip()] if "," in text else None
    if isinstance(devices, list):
        return len(devices) * trainer.num_nodes
    return devices * trainer.num_nodes if isinstance(devices, int) and devices > 0 else None


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
