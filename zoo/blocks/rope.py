"""Rotary position embedding (Su et al. 2021, "RoFormer", arXiv 2104.09864, Eq. 34).

Pairs ``(x_i, x_{i + d/2})`` are rotated by angle ``pos * theta^(-2i/d)`` (the "half" layout of
GPT-NeoX and Llama, so imported checkpoints need no permutation); ``q . k`` then depends only on the
relative position. The cos/sin tables are computed in float64 and kept out of the module's buffers,
so ``model.to(torch.bfloat16)`` never rounds them; the rotation runs in float32 (float64 for float64
inputs).
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, length: int, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            length = max(length, 2 * cached[0].shape[0] if cached else 256)
            inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (T, D/2)
            cached = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
            self._tables[key] = cached
        return cached

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape ``(B, H, T, D)`` whose first position is ``offset``."""
        T = x.shape[-2]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self._cos_sin(offset + T, x.device, dtype)
        cos, sin = cos[offset:offset + T], sin[offset:offset + T]  # (T, D/2)
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)
