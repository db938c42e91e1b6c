"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6).

``FFN(x) = W_down (silu(x W_gate) * (x W_up))``; gate and up are one fused ``d -> 2 d_hidden``
projection (gate rows first), so one GEMM serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import require_positive
from zoo.registry import BlockContext, register


@dataclass
class MLPConfig:
    d_hidden: int | None = None  # None: 8/3 d_model rounded up to a multiple of 64 (Llama)
    bias: bool = False

    def validate(self, model) -> None:
        require_positive(self, "d_hidden")

    def hidden_size(self, d_model: int) -> int:
        return self.d_hidden or 64 * -(-8 * d_model // (3 * 64))


class SwiGLU(nn.Module):
    """``(..., d_model) -> (..., d_model)``; the down projection gets GPT-2's depth-scaled init."""

    def __init__(self, d_model: int, d_hidden: int, ctx: BlockContext, bias: bool = False):
        super().__init__()
        self.d_hidden = d_hidden
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, d_model, bias=bias)
        self.init_std, self.out_std = ctx.init_std, ctx.residual_init_std

    def init_own_weights(self) -> None:
        nn.init.normal_(self.gate_up.weight, std=self.init_std)
        nn.init.normal_(self.down.weight, std=self.out_std)
        for linear in (self.gate_up, self.down):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (..., d_hidden) each
        return self.down(F.silu(gate) * up)


@register("ffn", "mlp", config=MLPConfig)
class MLP(SwiGLU):
    """The dense SwiGLU FFN of a decoder layer."""

    def __init__(self, config: MLPConfig, ctx: BlockContext):
        super().__init__(ctx.d_model, config.hidden_size(ctx.d_model), ctx, bias=config.bias)

    def forward(self, x: torch.Tensor, aux=None) -> torch.Tensor:
        return super().forward(x)
