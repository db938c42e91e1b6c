"""Turning a model's eligible ``nn.Linear`` layers into :class:`Float8Linear`, from outside the blocks.

As in torchtitan, blocks know nothing of FP8: the transformation walks the built model and swaps
modules. What stays in high precision (DeepSeek-V3 §3.3: embedding, output head, MoE gating, norms,
attention core): everything that is not an ``nn.Linear`` (embeddings, norms, attention scores,
packed expert weights), linears whose qualified name matches a skip pattern (by default the output /
MTP heads and routers/gates: :data:`DEFAULT_SKIP`, extended by ``model.fp8.skip`` or replaced by a
``module_filter``), and linears whose dims are not multiples of the recipe's granularity (16; 128
for blockwise).
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Sequence

from torch import nn

from zoo.fp8.linear import Backend, Float8Linear, make_recipe

ModuleFilter = Callable[[str, nn.Linear], bool]

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
    """Swap every eligible ``nn.Linear`` of ``model`` for a :class:`Float8Linear` in place; returns
    the qualified names swapped. ``module_filter(name, linear) -> bool`` replaces the default name
    filter (``DEFAULT_SKIP`` + ``skip``); the granularity check always applies."""
    fp8_recipe = make_recipe(recipe, weight_grad_high_precision)
    accept = module_filter or skip_patterns_filter((*DEFAULT_SKIP, *skip))
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (type(child) is nn.Linear and fits_granularity(child, fp8_recipe.granularity)
                    and accept(name, child)):
                setattr(parent, child_name, Float8Linear.from_linear(child, fp8_recipe, backend))
                converted.append(name)
    return converted


def apply_fp8(model: nn.Module, config) -> list[str]:
    """Apply a ``model.fp8`` config section (:class:`zoo.config.FP8Config`); a no-op for recipe ``none``."""
    if config.recipe == "none":
        return []
    return convert_to_float8(model, config.recipe, config.weight_grad_high_precision, config.backend, config.skip)
