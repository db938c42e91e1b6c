"""The model config: the ``model`` section of a config file, all that a :class:`~zoo.model.ZooModel` and its
checkpoint need. Blocks and converters are chosen by name from the registry (:class:`~zoo.schema.BlockSpec`):
``model.fp8`` configures the built-in FP8 converter, ``model.converters: [{type: NAME, ...}]`` any other,
``model.adapter: {type: NAME, ...}`` a parameter-efficient adapter (:mod:`zoo.adapters`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, Sequence

from zoo.registry import BlockContext
from zoo.errors import ConfigError, prefixed, require_positive
from zoo.fp8.convert import FP8Config
from zoo.schema import BlockSpec, apply_overrides, block_field, deep_copy, to_plain, typed


@dataclass
class LayerOverride:
    """Blocks of one layer that differ from the model's defaults (``model.layers: {i: {...}}``)."""

    mixer: BlockSpec | None = field(default=None, metadata={"kind": "mixer"})
    ffn: BlockSpec | None = field(default=None, metadata={"kind": "ffn"})


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
    norm: BlockSpec = block_field("norm", "rmsnorm")
    mixer: BlockSpec = block_field("mixer", "attention")
    ffn: BlockSpec = block_field("ffn", "mlp")
    layers: dict[int, LayerOverride] = field(default_factory=dict)
    fp8: FP8Config = field(default_factory=FP8Config)  # the fp8 converter (zoo.fp8)
    mtp: MTPConfig | None = None  # multi-token prediction (zoo.model.mtp); None: off
    converters: list[BlockSpec] = field(default_factory=list, metadata={"kind": "converter"})  # applied in order
    adapter: BlockSpec | None = field(default=None, metadata={"kind": "adapter"})  # zoo.adapters; None: none

    def layer_blocks(self, index: int) -> tuple[BlockSpec, BlockSpec]:
        """The (mixer, ffn) specs of layer ``index``, per-layer overrides applied."""
        override = self.layers.get(index, LayerOverride())
        return override.mixer or self.mixer, override.ffn or self.ffn

    def context(self, layer_idx: int) -> BlockContext:
        """The :class:`BlockContext` of the block at ``layer_idx`` (``n_layers`` and above: the final norm
        and the MTP modules)."""
        return BlockContext(self.d_model, self.n_layers, layer_idx, self.max_seq_len, self.init_std)

    def converter_specs(self) -> list[BlockSpec]:
        """The converters to apply to a built model, in order: ``fp8`` (its own section, a no-op for recipe
        ``none``), then the ``converters`` list."""
        return [BlockSpec("fp8", self.fp8), *self.converters]

    def without_mtp(self) -> "ModelConfig":
        """A copy without multi-token prediction (this config is unchanged)."""
        return replace(self, mtp=None)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping, path: str = "model") -> "ModelConfig":
        """A validated model config from the raw ``model`` section."""
        config = typed(cls, complete_layer_overrides(deep_copy(data)), path)
        validate_model(config)
        return config

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> "ModelConfig":
        """A new config with dotted ``model.*`` overrides applied (this one is unchanged)."""
        raw = apply_overrides({"model": self.to_dict()}, overrides)
        outside = sorted(set(raw) - {"model"})
        if outside:
            raise ConfigError(f"only model.* keys can be overridden here, got {', '.join(outside)}")
        return ModelConfig.from_dict(raw["model"])


def complete_layer_overrides(model: Any) -> Any:
    """Merge each partial per-layer block of a raw ``model`` section over the model's default block of the
    same type, in place.

    ``layers: {0: {ffn: {d_hidden: 1024}}}`` keeps the default FFN's type and other options; an
    override naming another ``type`` starts from that block's own defaults instead.
    """
    if not isinstance(model, dict) or not isinstance(model.get("layers"), dict):
        return model
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
    return model


def validate_model(model: ModelConfig) -> None:
    """Cross-key checks of a model section that typing alone cannot make; errors name the keys."""
    prefixed("model", require_positive, model, "vocab_size", "d_model", "n_layers", "max_seq_len", "init_std")
    for index in model.layers:
        if not 0 <= index < model.n_layers:
            raise ConfigError(f"model.layers.{index}: layer index out of range for model.n_layers={model.n_layers}")
    specs = [("model.norm", model.norm), ("model.mixer", model.mixer), ("model.ffn", model.ffn)]
    for index, override in sorted(model.layers.items()):
        specs += [(f"model.layers.{index}.{part}", getattr(override, part)) for part in ("mixer", "ffn")]
    if model.mtp is not None:
        prefixed("model.mtp", model.mtp.validate)
        specs += [(f"model.mtp.{part}", getattr(model.mtp, part)) for part in ("mixer", "ffn")]
    for path, spec in specs:
        check = getattr(spec.options, "validate", None) if spec is not None else None
        if check is not None:
            prefixed(path, check, model)
    prefixed("model.fp8", model.fp8.validate)
    for index, spec in enumerate(model.converters):
        check = getattr(spec.options, "validate", None)
        if check is not None:
            prefixed(f"model.converters[{index}]", check)
    check = getattr(model.adapter.options, "validate", None) if model.adapter is not None else None
    if check is not None:
        prefixed("model.adapter", check)
