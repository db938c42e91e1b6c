"""Rotary position embedding (Su et al. 2021, "RoFormer", arXiv 2104.09864, Eq. 34).

Pairs ``(x_i, x_{i + d/2})`` are rotated by angle ``pos * theta^(-2i/d)`` (the "half" layout of
GPT-NeoX and Llama, so imported checkpoints need no permutation); ``q . k`` then depends only on the
relative position. The cos/sin tables are computed in float64 and kept out of the module's buffers,
so ``model.to(torch.bfloat16)`` never rounds them; the rotation runs in float32 (float64 for float64
inputs) as one autograd node, four elementwise passes forward and four backward.
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
        if torch.compiler.is_compiling():  # computed inside the graph: a cache filled on the first call would
            return self._tables_for(length, device, dtype)  # make Dynamo compile the block a second time
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            cached = self._tables_for(max(length, 2 * cached[0].shape[0] if cached else 256), device, dtype)
            self._tables[key] = cached
        return cached

    def _tables_for(self, length: int, device: torch.device, dtype: torch.dtype):
        # Eagerly on the CPU (one libm for every device); in a compiled graph on the device itself.
        where = device if torch.compiler.is_compiling() else "cpu"
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=where) / self.head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float64, device=where), inv_freq)  # (T, D/2)
        return angles.cos().to(device, dtype), angles.sin().to(device, dtype)

    def forward(self, x: torch.Tensor, offset: int = 0, seq_dim: int = -2) -> torch.Tensor:
        """Rotate ``x (..., D)`` whose positions run along ``seq_dim`` (``(B, H, T, D)`` by default,
        ``seq_dim=1`` for ``(B, T, H, D)``) and whose first position is ``offset``."""
        seq_dim = seq_dim % x.dim()
        T = x.shape[seq_dim]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self._cos_sin(offset + T, x.device, dtype)
        broadcast = (T,) + (1,) * (x.dim() - seq_dim - 2) + (self.head_dim // 2,)
        cos, sin = cos[offset:offset + T].view(broadcast), sin[offset:offset + T].view(broadcast)
        if not (torch.is_grad_enabled() and x.requires_grad):  # decoding: no autograd node to build
            return _rotate(x, cos, sin, 1.0)
        return _Rotate.apply(x, cos, sin)


class _Rotate(torch.autograd.Function):
    """``y = (x1 cos - x2 sin, x2 cos + x1 sin)`` for the halves ``x1, x2`` of the last dimension; the
    gradient is the rotation by the opposite angle, so nothing but the tables is saved. Products are formed
    in the tables' float32 (float64) and rounded once into ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():  # Dynamo cannot trace out= into the halves; Inductor fuses this into one pass
        return torch.cat((x1 * cos - sign * (x2 * sin), x2 * cos + sign * (x1 * sin)), dim=-1).to(x.dtype)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out1, out2 = out.chunk(2, dim=-1)
    torch.addcmul(x1 * cos, x2, sin, value=-sign, out=out1)
    torch.addcmul(x2 * cos, x1, sin, value=sign, out=out2)
    return out
