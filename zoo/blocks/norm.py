"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", Eq. 4).

``y = x / sqrt(mean(x^2) + eps) * g``, computed in at least float32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ConfigError
from zoo.registry import BlockContext, register


@dataclass
class RMSNormConfig:
    eps: float = 1.0e-6

    def validate(self, model) -> None:
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; shape-preserving ``(..., dim) -> (..., dim)``."""

    def __init__(self, dim: int, eps: float = 1.0e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_own_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == dtype == self.weight.dtype:  # the usual case: a float32 residual stream
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps)
        return y.to(x.dtype)


@register("norm", "rmsnorm", config=RMSNormConfig)
class ModelRMSNorm(RMSNorm):
    """RMSNorm as a registered model norm over ``d_model``."""

    def __init__(self, config: RMSNormConfig, ctx: BlockContext):
        super().__init__(ctx.d_model, config.eps)
