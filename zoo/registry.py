"""The registry: ``kind -> name -> (class, config dataclass)``.

It never imports what it registers: the package face (``zoo/__init__.py``) imports the built-in blocks,
dispatchers, converters and objectives, which register themselves, so everything is registered once
``import zoo`` has run.

A block is an ``nn.Module`` built as ``Block(config, ctx)``, where ``config`` is an instance of the
dataclass registered with it (the YAML section minus its ``type`` key) and ``ctx`` is a
:class:`BlockContext` holding what the block may know of the model around it. Registering a block
is all it takes for configs to name it::

    @dataclass
    class GeluMLPConfig:
        d_hidden: int = 1024

    @zoo.register("ffn", "gelu_mlp", config=GeluMLPConfig)
    class GeluMLP(nn.Module):
        def __init__(self, config: GeluMLPConfig, ctx: zoo.BlockContext): ...  # allocate, keep ctx.init_std
        def init_own_weights(self): ...  # fill them (the block contract in zoo.blocks)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

# The seams of zoo, one registry kind each: blocks of the decoder (mixer, ffn, norm), how the MoE layers
# move tokens to their experts (dispatcher), transformations of a built model (converter), parameter-efficient
# fine-tuning of a built model (adapter), and what a training step optimises (objective). Registering under
# another kind makes a new one.
KINDS = ("mixer", "ffn", "norm", "dispatcher", "converter", "adapter", "objective")


@dataclass(frozen=True)
class BlockContext:
    """What a block may know of the model it sits in (passed to every block constructor)."""

    d_model: int
    n_layers: int
    layer_idx: int
    max_seq_len: int
    init_std: float

    @property
    def residual_init_std(self) -> float:
        """GPT-2's depth-scaled init for projections that write into the residual stream."""
        return self.init_std / (2 * self.n_layers) ** 0.5


@dataclass(frozen=True)
class Entry:
    name: str
    block: type
    config: type


@dataclass
class _EmptyConfig:
    """Config of a block that takes no options."""


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, config: type | None = None) -> Callable[[type], type]:
    """Class decorator adding a block under ``kind`` (``mixer``, ``ffn``, ``norm``, ...) and ``name``.

    ``config`` is the block's options dataclass (every field needs a default); configs name the
    block with ``{type: name, **options}``. Registering a name twice is an error.
    """
    config = config or _EmptyConfig
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register({kind!r}, {name!r}): config must be a dataclass, got {config!r}")

    def decorator(block: type) -> type:
        entries = _REGISTRY.setdefault(kind, {})
        if name in entries and entries[name].block is not block:
            raise ValueError(f"a {kind} block named {name!r} is already registered ({entries[name].block})")
        entries[name] = Entry(name, block, config)
        return block

    return decorator


def unregister(kind: str, name: str) -> None:
    """Remove a block (for tests and interactive sessions that re-register)."""
    _REGISTRY.get(kind, {}).pop(name, None)


def available(kind: str) -> list[str]:
    """Sorted names registered for ``kind``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown block kind {kind!r}; known kinds: {', '.join(sorted(_REGISTRY))}")
    return sorted(_REGISTRY[kind])


def lookup(kind: str, name: str) -> Entry | None:
    return _REGISTRY.get(kind, {}).get(name)


def build(kind: str, name: str, config: Any, ctx: BlockContext):
    """The registered block ``name`` of ``kind``, built from its ``config`` and ``ctx``.

    A block with ``init_own_weights`` only allocates in its constructor (the init pass fills it), so it can be
    built on the meta device. A block without it (a user's block of plain torch modules) initialises itself in
    its constructor, as any torch module does: it is built on the CPU even inside a meta-device construction,
    so what its constructor set (buffers included) survives; the model then moves it where the model goes."""
    entry = lookup(kind, name)
    if entry is None:
        raise KeyError(f"no {kind} block named {name!r}; registered: {available(kind)}")
    if hasattr(entry.block, "init_own_weights"):
        return entry.block(config, ctx)
    with torch.device("cpu"):
        return entry.block(config, ctx)

