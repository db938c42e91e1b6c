"""The pre-norm residual decoder layer (GPT-2, Radford et al. 2019 §2.3) every model stacks."""

from __future__ import annotations

import torch
from torch import nn

from zoo import registry
from zoo.blocks.auxiliary import AuxCollector
from zoo.model.config import ModelConfig
from zoo.registry import BlockContext
from zoo.schema import BlockSpec


class Block(nn.Module):
    """One pre-norm decoder layer: ``x + mixer(norm(x))``, then ``x + ffn(norm(x))``.

    ``mixer`` / ``ffn`` specs default to layer ``ctx.layer_idx``'s (MTP modules pass their own)."""

    def __init__(self, config: ModelConfig, ctx: BlockContext, mixer: BlockSpec | None = None,
                 ffn: BlockSpec | None = None):
        super().__init__()
        default_mixer, default_ffn = config.layer_blocks(ctx.layer_idx)
        mixer, ffn = mixer or default_mixer, ffn or default_ffn
        self.mixer_norm = registry.build("norm", config.norm.type, config.norm.options, ctx)
        self.mixer = registry.build("mixer", mixer.type, mixer.options, ctx)
        self.ffn_norm = registry.build("norm", config.norm.type, config.norm.options, ctx)
        self.ffn = registry.build("ffn", ffn.type, ffn.options, ctx)

    def forward(self, x: torch.Tensor, aux: AuxCollector, state=None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), state)
        return x + self.ffn(self.ffn_norm(x), aux)
