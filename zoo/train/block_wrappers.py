"""Training-only transformations of each decoder block: activation checkpointing and ``torch.compile``.

Both are applied from outside the model, one decoder block at a time, as torchtitan does (``apply_ac``,
``apply_compile``):

- ``train.activation_checkpointing: full`` keeps only each block's input during the forward pass and recomputes
  the block in backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", §3; the
  non-reentrant ``torch.utils.checkpoint``). Results are unchanged: the model closes its
  :class:`~zoo.blocks.auxiliary.AuxCollector` when its forward ends, so a recomputed MoE layer reports no loss
  and counts no token twice.
- ``train.compile: true`` compiles each block's forward with ``torch.compile`` (TorchDynamo + Inductor; Ansel et
  al. 2024, "PyTorch 2", §3-4); every block of one structure shares the compiled code.

The wrapper replaces the block's ``forward`` on the instance and nothing else: the module tree, parameter names
and state dicts stay those of the plain model (no ``_orig_mod.`` or ``_checkpoint_wrapped_module.`` prefixes), so
checkpoints written during or after such a run load into a plain model. :func:`unwrap_blocks` restores the
class's own forward, e.g. before decoding with a trained model.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.errors import ConfigError
from zoo.model.block import Block

ACTIVATION_CHECKPOINTING = ("none", "full")


def wrap_blocks(model: nn.Module, activation_checkpointing: str = "none", compile: bool = False,
                backend: str = "inductor") -> nn.Module:
    """Give every decoder :class:`~zoo.model.block.Block` of ``model`` (the MTP modules' too) a training forward:
    recomputed in backward when ``activation_checkpointing == "full"``, compiled by ``torch.compile(...,
    backend=backend)`` when ``compile``. Wrapping again replaces the previous wrappers. Returns ``model``."""
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ConfigError(f"train.activation_checkpointing: {activation_checkpointing!r} is not allowed; choose one "
                          f"of {', '.join(ACTIVATION_CHECKPOINTING)}")
    if compile and backend == "inductor":
        check_compiler(model)
    unwrap_blocks(model)
    if activation_checkpointing == "none" and not compile:
        return model
    for block in decoder_blocks(model):
        forward = block.forward  # the class's, bound to this block
        if activation_checkpointing == "full":
            forward = functools.partial(recomputed, forward, functools.partial(checkpoint, use_reentrant=False))
        block.forward = torch.compile(forward, backend=backend) if compile else forward
    return model


def unwrap_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`wrap_blocks`: every decoder block runs its class's forward again. Returns ``model``."""
    for block in decoder_blocks(model):
        block.__dict__.pop("forward", None)
    return model


def decoder_blocks(model: nn.Module) -> list[Block]:
    """The decoder blocks of ``model`` in ``modules()`` order: the main stack, then the MTP modules' blocks."""
    return [module for module in model.modules() if isinstance(module, Block)]


def recomputed(forward, checkpoint_fn, *args, **kwargs):
    """``forward(*args)`` run through ``checkpoint_fn`` (``torch.utils.checkpoint.checkpoint`` with its options
    bound), so its intermediate activations are recomputed in backward rather than kept; outside training (eval
    mode or no autograd) a plain call. ``forward`` is a block's bound forward."""
    if not (torch.is_grad_enabled() and forward.__self__.training):
        return forward(*args, **kwargs)
    return checkpoint_fn(forward, *args, **kwargs)


def check_compiler(model: nn.Module) -> None:
    """Raise :class:`ConfigError` when Inductor would need a C++ compiler for ``model``'s CPU parameters and none
    is on the PATH (Inductor calls ``$CXX``, else ``g++``, or ``clang++`` on macOS)."""
    if not any(p.device.type == "cpu" for p in model.parameters()):
        return
    compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(compiler) is None:
        raise ConfigError(f"train.compile=true: torch.compile's CPU backend needs a C++ compiler and {compiler!r} "
                          "is not on the PATH; install one (e.g. g++) or set $CXX, or set train.compile=false")
