"""Refusing models that cannot fit, before anything is allocated.

The parameter count is estimated from the config: the embedding and head from their shapes, each layer by
building one layer of each distinct (mixer, ffn) pair on the meta device (no memory, no compute) and counting
its parameters. A model whose parameters alone exceed the memory of the device it would be built on fails
with a :class:`~zoo.errors.ConfigError` naming the key to change, instead of hanging while it builds a
trillion modules or dying inside the allocator.
"""

from __future__ import annotations

import os

import torch

from zoo.errors import ConfigError
from zoo.model.block import Block
from zoo.model.config import ModelConfig

_MAX_WIDTH = 2 ** 31  # beyond this one d_model x d_model matrix overflows any memory (and int64 numels)


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (physical RAM for the CPU), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
            return None
    return None


def _layer_parameters(config: ModelConfig, index: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Block(config, config.context(index)).parameters())


def check_fits(config: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """Raise :class:`ConfigError` when the parameters of ``config``'s model would exceed the memory of
    ``device`` (the default device); meta devices and devices of unknown size are not checked."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    available = device_memory_bytes(device)
    if available is None:
        return
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    vocab = config.vocab_size or 1
    width = f"model.d_model={config.d_model}"
    if config.d_model >= _MAX_WIDTH:
        raise ConfigError(f"{width} is too wide to build: one d_model x d_model matrix alone exceeds any "
                          "memory; reduce model.d_model")
    embedding = vocab * config.d_model * (1 if config.tie_embeddings else 2) * itemsize
    if embedding > available:
        key = "model.vocab_size" if vocab > config.d_model else "model.d_model"
        raise ConfigError(f"{key}: the embedding and output head alone need {format_bytes(embedding)} of parameters, but "
                          f"the {device.type} device has {format_bytes(available)} of memory; reduce {key}")
    # Layers without a per-layer override all share the default blocks: one meta build counts them all.
    indices = sorted(set(config.layers) | {next((i for i in range(config.n_layers) if i not in config.layers), 0)})
    total = embedding
    for index in indices:
        mixer, ffn = config.layer_blocks(index)
        layer = _layer_parameters(config, index) * itemsize
        if layer > available:
            raise ConfigError(f"{width}: one layer ({mixer.type} + {ffn.type}) needs {format_bytes(layer)} of parameters, "
                              f"but the {device.type} device has {format_bytes(available)}; reduce model.d_model or the "
                              "blocks' widths")
        total += layer * (1 if index in config.layers else config.n_layers - len(config.layers))
    if total > available:
        raise ConfigError(f"model.n_layers={config.n_layers}: the model's parameters need {format_bytes(total)}, but the "
                          f"{device.type} device has {format_bytes(available)} of memory; reduce model.n_layers")


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in binary units, one decimal: ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n_bytes) < 1024:
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"
