"""Turning a model's eligible ``nn.Linear`` layers into :class:`Float8Linear`, from outside the blocks.

As in torchtitan, blocks know nothing of FP8: the transformation walks the built model and swaps
modules (``nn.Linear`` -> :class:`Float8Linear`, packed MoE ``Experts`` -> :class:`Float8Experts`).
Everything else stays in high precision, as DeepSeek-V3 §3.3.1 keeps the embedding, output head, MoE
gating, normalisation and attention operators: modules that are neither linears nor packed experts
(embeddings, norms, the attention and retention cores), linears whose qualified name matches a skip
pattern (by default the output / MTP heads and the routers and gates: :data:`DEFAULT_SKIP`, extended by
``model.fp8.skip`` or replaced by a ``module_filter``), and linears whose dims are not multiples of the
recipe's granularity (16; 128 for blockwise).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from torch import nn

from zoo.blocks.experts import Experts
from zoo.errors import ConfigError
from zoo.fp8.experts import Float8Experts
from zoo.fp8.linear import Backend, Float8Linear, Recipe, make_recipe
from zoo.registry import register

ModuleFilter = Callable[[str, nn.Module], bool]

DEFAULT_SKIP = ("head", "*head", "*router*", "*gate")  # output/MTP heads, MoE routers and gates


def skip_patterns_filter(patterns: Sequence[str] = DEFAULT_SKIP) -> ModuleFilter:
    """A filter accepting linears whose qualified name matches none of the fnmatch ``patterns``."""
    patterns = tuple(patterns)
    return lambda name, module: not any(fnmatch.fnmatchcase(name, p) for p in patterns)


def fits_granularity(module: nn.Linear, granularity: int) -> bool:
    """Whether both dims of ``module`` are multiples of ``granularity``."""
    return module.in_features % granularity == 0 and module.out_features % granularity == 0


def convert_to_float8(model: nn.Module, recipe: str, weight_grad_high_precision: bool = False,
                      backend: Backend = "auto", skip: Sequence[str] = (),
                      module_filter: ModuleFilter | None = None) -> list[str]:
    """Swap every eligible ``nn.Linear`` (packed ``Experts``) of ``model`` for a :class:`Float8Linear`
    (:class:`zoo.fp8.experts.Float8Experts`) in place; returns
    the qualified names swapped. ``module_filter(name, module) -> bool`` replaces the default name
    filter (``DEFAULT_SKIP`` + ``skip``); the granularity check always applies."""
    fp8_recipe = make_recipe(recipe, weight_grad_high_precision)
    accept = module_filter or skip_patterns_filter((*DEFAULT_SKIP, *skip))
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if accept(name, child) and (new := _float8_version(child, fp8_recipe, backend)) is not None:
                setattr(parent, child_name, new)
                converted.append(name)
    return converted


def _float8_version(module: nn.Module, recipe: Recipe, backend: Backend) -> nn.Module | None:
    """The FP8 module replacing ``module``, or None if it is not a linear / packed experts fitting the recipe."""
    if type(module) is nn.Linear and fits_granularity(module, recipe.granularity):
        return Float8Linear.from_linear(module, recipe, backend)
    dims = (module.gate_up_proj.shape[2], module.d_hidden) if type(module) is Experts else ()
    if dims and all(d % recipe.granularity == 0 for d in dims):
        return Float8Experts.from_experts(module, recipe)
    return None


@dataclass
class FP8Config:
    """``model.fp8``: FP8 GEMMs for the eligible linear layers; off by default."""

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


@register("converter", "fp8", config=FP8Config)
class Float8Converter:
    """The model converter for ``model.fp8``: :func:`convert_to_float8` with the section's options; a
    no-op for recipe ``none``."""

    def __init__(self, config: FP8Config):
        self.config = config

    def convert(self, model: nn.Module) -> nn.Module:
        config = self.config
        if config.recipe != "none":
            convert_to_float8(model, config.recipe, config.weight_grad_high_precision, config.backend, config.skip)
        return model
