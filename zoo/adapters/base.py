"""The adapter seam: parameter-efficient fine-tuning as a transformation of a built model.

An adapter is registered under the kind ``adapter`` with its options dataclass and built as
``Adapter(options)``; ``adapter.apply(model)`` freezes every base parameter (``requires_grad=False``: the
pre-trained weights stay bitwise unchanged, Hu et al. 2021 §4) and inserts its own trainable modules, in
place. Every module an adapter inserts subclasses :class:`AdapterModule`, which gives the model-wide
switches their handle:

* :func:`adapter_disabled` turns every adapter module off at once, so the model computes exactly its base
  (the reference model of DPO, Rafailov et al. 2023 §4, without a second copy);
* :func:`merge_adapter` replaces each adapter module by the plain module its ``merged()`` folds it into;
* :func:`adapter_state_dict` is what an adapter checkpoint holds: the parameters named ``lora_*`` and the
  like, reported by each module's ``adapter_parameter_names()``.

The model's config records the adapter (``model.adapter``), so a model rebuilt from its config is adapted
again, and saving knows to write adapter files only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from zoo import registry
from zoo.errors import prefixed
from zoo.schema import BlockSpec, block_spec


class AdapterModule(nn.Module):
    """A module an adapter inserted. ``adapter_enabled`` (True) switches its adapter part on or off; with it
    off the module computes its base module's function exactly. Subclasses name their own parameters in
    ``ADAPTER_PARAMETERS`` (prefixes of parameter names) and implement ``merged()`` when they can be
    folded into a plain module (LoRA, DoRA), or leave it raising (prompt and prefix tuning)."""

    ADAPTER_PARAMETERS: tuple[str, ...] = ()
    adapter_enabled: bool = True

    def adapter_parameter_names(self) -> list[str]:
        """Names (relative to this module) of its own adapter parameters."""
        return [name for name, _ in self.named_parameters(recurse=False)
                if name.startswith(self.ADAPTER_PARAMETERS)]

    def merged(self) -> nn.Module:
        """The plain module computing what this one computes, adapter folded in."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base module")


def adapter_spec(spec: BlockSpec | dict | str) -> BlockSpec:
    """``spec`` as a validated :class:`BlockSpec` of the ``adapter`` kind (a mapping ``{type: NAME, ...}`` is
    checked as a config file's ``model.adapter`` is, errors naming that key)."""
    if isinstance(spec, BlockSpec):
        return spec
    spec = block_spec("adapter", spec, "model.adapter")
    check = getattr(spec.options, "validate", None)
    if check is not None:
        prefixed("model.adapter", check)
    return spec


def apply_adapter(model: nn.Module) -> nn.Module:
    """Apply the adapter ``model.config.adapter`` names (nothing when it is None); returns the model."""
    spec = model.config.adapter
    if spec is None:
        return model
    if has_adapter(model):
        raise ValueError("the model already has an adapter; merge it (model.merge_adapter()) before adding another")
    return registry.lookup("adapter", spec.type).block(spec.options).apply(model)


def add_adapter(model: nn.Module, spec: BlockSpec | dict | str, base: str | None = None) -> nn.Module:
    """Adapt a built model in place: ``spec`` is ``model.adapter``'s value (``{"type": "lora", "r": 8}``), the
    base weights are frozen. ``base`` says where the frozen base came from (a local path or
    ``hf-hub:ORG/NAME[@REV]``); adapter checkpoints name it so that loading them finds the base. Returns the
    model, its config now recording the adapter."""
    spec = adapter_spec(spec)
    if has_adapter(model):
        raise ValueError("the model already has an adapter; merge it (model.merge_adapter()) before adding another")
    model.config = dataclasses.replace(model.config, adapter=spec)
    model.adapter_base = base
    return apply_adapter(model)


def adopt(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance (a subclass of ``type(module)``) holding ``module``'s attributes, parameters, buffers
    and children themselves, not copies: the base tensors keep their identity and state-dict names."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    bookkeeping = set(vars(new)) - {"training"}  # nn.Module's own registries and hooks, set up afresh
    new.__dict__.update({k: v for k, v in vars(module).items() if k not in bookkeeping})
    for name, p in module._parameters.items():  # a None bias stays registered as None
        new.register_parameter(name, p)
    for name, b in module.named_buffers(recurse=False):
        new.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    for name, child in module.named_children():
        new.add_module(name, child)
    return new


def freeze(model: nn.Module) -> None:
    """Every parameter of ``model`` without gradient (the frozen base of an adapter)."""
    for p in model.parameters():
        p.requires_grad_(False)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """``(qualified name, module)`` of every adapter module of ``model``."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, AdapterModule))


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` holds any adapter module."""
    return any(True for _ in adapter_modules(model))


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapter module of ``model`` computes its base module exactly (LoRA's
    ``B A`` term, DoRA's magnitude, prompts and prefixes all off); each module's previous switch is restored
    on exit, exceptions included. Works under ``torch.no_grad`` (it only flips switches)."""
    modules = [m for _, m in adapter_modules(model)]
    previous = [m.adapter_enabled for m in modules]
    try:
        for m in modules:
            m.adapter_enabled = False
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.adapter_enabled = state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters of ``model`` by state-dict name (what an adapter checkpoint holds)."""
    return {f"{name}.{p}" if name else p: getattr(m, p).detach()
            for name, m in adapter_modules(model) for p in m.adapter_parameter_names()}


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter module into the plain module it stands for (:meth:`AdapterModule.merged`), in
    place; the config loses ``adapter``, tied weights are tied again and every parameter trains again.
    Returns the model."""
    for name, module in list(adapter_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.merged())
    if callable(getattr(model, "tie_weights", None)):  # a merged embedding and head are two tensors until re-tied
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(True)
    model.config = dataclasses.replace(model.config, adapter=None)
    model.adapter_base = None
    return model
