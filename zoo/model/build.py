"""Building a model from its config: construct, initialise, convert.

Construction only allocates: each module stores the init scales its :class:`~zoo.registry.BlockContext` gave it,
and its ``init_own_weights()`` fills its tensors (the block contract in :mod:`zoo.blocks`). :func:`build_model`
constructs on the meta device, allocates every tensor once, runs the init pass
(:func:`init_weights`), then the converters the config names (``model.fp8``, ``model.converters``), in that order, so a converter
sees initialised weights, and last the adapter (``model.adapter``), which freezes what the converters made. Constructing on meta first means nothing is filled twice: the default init that
``nn.Linear`` runs in its constructor lands on meta tensors, where it computes nothing.
:func:`build_skeleton` is that meta-device model alone, for a checkpoint to fill, and :func:`materialize`
allocates and initialises the part of a skeleton that a checkpoint does not hold.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterator

import torch
from torch import nn

from zoo import registry
from zoo.adapters import apply_adapter
from zoo.model.config import ModelConfig
from zoo.model.decoder import ZooModel
from zoo.model.memory import check_fits

Holders = list[tuple[str, nn.Module]]  # (state-dict prefix, module) of the modules whose own tensors one init fills


def init_weights(module: nn.Module) -> nn.Module:
    """The init pass over ``module`` (a whole model or one block): every module's tensors filled once, by
    the module's ``init_own_weights()``, else by its parent's, else by torch's ``reset_parameters()`` (a
    registered block built from torch modules without ``init_own_weights`` gets torch's default init).
    Modules run in ``module.modules()`` order, parents first, so a seed fixes every weight. Returns ``module``."""
    with torch.no_grad():
        for fill, _ in _initialisers(module):
            fill()
    return module


def materialize(model: nn.Module, held: Collection[str], device: torch.device | str | None = None) -> nn.Module:
    """Allocate on ``device`` (the default device if None) and initialise the part of a meta-device ``model``
    that the state-dict names ``held`` do not cover (non-persistent buffers are never in a state dict).

    Each init that fills such a tensor runs on all the tensors it fills, so it is given all of them: a router
    whose load counts are not held gets its weight and bias allocated and drawn too, for ``load_state_dict(...,
    assign=True)`` to replace. Everything else stays on meta, to be assigned from the checkpoint without a
    copy. Returns ``model``."""
    device = torch.get_default_device() if device is None else device
    held = set(held)
    with torch.no_grad():
        for fill, holders in _initialisers(model):
            names = {prefix + name for prefix, holder in holders for name, _ in _own_tensors(holder)}
            if names - held:
                for _, holder in holders:
                    _allocate(holder, device, recurse=False)
                fill()
    if isinstance(model, ZooModel):
        model.tie_weights()  # allocating gave the head a tensor of its own
    return model


def apply_converters(model: ZooModel) -> ZooModel:
    """Apply the converters ``model.config`` names (:meth:`ModelConfig.converter_specs`), in order. A converter
    is registered under the kind ``converter`` with its options dataclass; ``Converter(options).convert(model)``
    transforms the model (in place or not) and returns it."""
    for spec in model.config.converter_specs():
        model = registry.lookup("converter", spec.type).block(spec.options).convert(model)
    return model


def build_model(config: ModelConfig) -> ZooModel:
    """An initialised :class:`ZooModel` for a validated model config on the default device, its converters
    applied, then its adapter (``model.adapter``, :mod:`zoo.adapters`: the base frozen, adapter modules
    inserted)."""
    device = torch.get_default_device()
    check_fits(config, device)  # before anything is built: a model that cannot fit is refused at once
    model = _allocate(build_skeleton(config), device)
    model.tie_weights()  # allocating gave the head a tensor of its own
    return apply_adapter(apply_converters(init_weights(model)))


def build_skeleton(config: ModelConfig) -> ZooModel:
    """``config``'s model on the meta device: shapes only, nothing initialised, for a checkpoint to fill
    (``load_state_dict(..., assign=True)``) or for ``to_empty`` and :func:`init_weights`."""
    with torch.device("meta"):
        return ZooModel(config)


def _allocate(module: nn.Module, device, recurse: bool = True) -> nn.Module:
    """``module.to_empty(device=device, recurse=recurse)`` for its meta tensors, with ``torch.empty`` for
    ``empty_like`` (whose meta-tensor path runs a Python reference that imports sympy); tensors that already
    hold values (a block that initialised itself, see :func:`zoo.registry.build`) keep them, moved to ``device``."""
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device) if t.is_meta else t.to(device),
                         recurse=recurse)


def _initialisers(root: nn.Module) -> Iterator[tuple[Callable[[], None], Holders]]:
    """``(fill, holders)`` for each init of the pass over ``root``, in ``root.modules()`` order: a module's
    ``init_own_weights`` fills its own tensors and those of its children without the method (the
    ``nn.Linear`` and ``nn.Embedding`` it holds); a torch module with ``reset_parameters`` under a parent
    without ``init_own_weights`` fills its own."""
    parents = {id(child): module for module in root.modules() for child in module.children()}
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(module, "init_own_weights"):
            children = [(f"{prefix}{n}.", c) for n, c in module.named_children() if not hasattr(c, "init_own_weights")]
            yield module.init_own_weights, [(prefix, module), *children]
        elif hasattr(module, "reset_parameters") and not hasattr(parents.get(id(module)), "init_own_weights"):
            yield module.reset_parameters, [(prefix, module)]


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)
