"""Causal multi-head attention with grouped K/V heads, rotary positions and a KV cache.

Scaled dot-product attention (Vaswani et al. 2017, Eq. 1): ``softmax(Q K^T / sqrt(d)) V`` under a
causal mask; rotary positions on Q and K (Su et al. 2021, Eq. 34), optionally scaled for longer contexts
(``rope_scaling``, :mod:`zoo.blocks.rope`); ``n_kv_heads`` K/V heads shared by groups of query heads (GQA,
Ainslie et al. 2023, §2; MQA at ``n_kv_heads=1``). ``qk_norm`` RMS-normalises queries and keys before the
rotation (Dehghani et al. 2023, arXiv 2302.05442, §3.1), over the whole projections (OLMoE) or per head
(``qk_norm_scope: head``, Qwen3).

Backends compute the same function: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``),
``eager`` (the plain reference, any dtype), ``xformers`` (``memory_efficient_attention``, CUDA only).
``auto`` picks xformers for CUDA tensors when it is installed, sdpa otherwise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.norm import RMSNorm
from zoo.blocks.rope import RotaryEmbedding
from zoo.blocks.state import PositionalCache
from zoo.errors import ConfigError, require_positive
from zoo.registry import BlockContext, register
from zoo.schema import BlockSpec

Backend = Literal["auto", "sdpa", "eager", "xformers"]
QKNormScope = Literal["projection", "head"]


@dataclass
class AttentionConfig:
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads (MHA); 1: MQA
    head_dim: int | None = None  # None: d_model / n_heads
    rope_theta: float = 10000.0
    # {type: linear | dynamic | llama3 | yarn, ...} (zoo.blocks.rope); None: unscaled
    rope_scaling: BlockSpec | None = field(default=None, metadata={"kind": "rope_scaling"})
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm on q and k before rope
    # ... over the whole q and k projections before the head split (OLMoE), or over each head (Qwen3)
    qk_norm_scope: QKNormScope = "projection"
    qk_norm_eps: float = 1.0e-6
    backend: Backend = "auto"

    def validate(self, model) -> None:
        require_positive(self, "n_heads", "n_kv_heads", "head_dim", "rope_theta")
        if self.rope_scaling is not None:
            self.rope_scaling.options.validate()
        if self.qk_norm_scope != "projection" and not self.qk_norm:
            raise ConfigError(f"qk_norm_scope={self.qk_norm_scope!r} needs qk_norm: true")
        if self.head_dim is None and model.d_model % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} does not divide model.d_model={model.d_model} "
                              f"(set head_dim or change n_heads / d_model)")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.dim_per_head(model.d_model) % 2:
            raise ConfigError(f"rotary positions need an even head dimension, got "
                              f"{self.dim_per_head(model.d_model)} (d_model / n_heads or head_dim)")
        if self.backend == "xformers":
            _import_xformers()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dim_per_head(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads


class KVCache(PositionalCache):
    """Keys and values of the tokens seen so far, preallocated to ``max_len`` positions.

    ``k, v: (B, n_kv_heads, max_len, head_dim)``; ``length`` tokens are filled. A
    :class:`~zoo.blocks.state.DecodingState` whose snapshot is the length: rolling back only shortens it.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v: (B, Hkv, T, D)`` after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.k.shape[2]} allocated")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


@register("mixer", "attention", config=AttentionConfig)
class Attention(nn.Module):
    """Causal GQA self-attention with RoPE: ``(B, T, d_model) -> (B, T, d_model)``."""

    def __init__(self, config: AttentionConfig, ctx: BlockContext):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.dim_per_head(ctx.d_model)
        self.backend = config.backend
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(ctx.d_model, q_dim + 2 * kv_dim, bias=config.qkv_bias)
        self.out = nn.Linear(q_dim, ctx.d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, config.rope_theta,
                                    config.rope_scaling.options if config.rope_scaling else None)
        self.norm_per_head = config.qk_norm_scope == "head"
        q_norm_dim, k_norm_dim = (self.head_dim, self.head_dim) if self.norm_per_head else (q_dim, kv_dim)
        self.q_norm = RMSNorm(q_norm_dim, config.qk_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(k_norm_dim, config.qk_norm_eps) if config.qk_norm else None
        self.init_std, self.out_std = ctx.init_std, ctx.residual_init_std

    def init_own_weights(self) -> None:
        nn.init.normal_(self.qkv.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.out_std)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)

    def init_state(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        """The decoding state of this mixer: a KV cache for ``max_len`` positions."""
        return KVCache(batch_size, self.n_kv_heads, self.head_dim, max_len, device, dtype)

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        offset = state.length if state is not None else 0
        positions = state.positions() if state is not None else 0  # per row where rows are left-padded
        qkv = self.qkv(x)  # (B, T, (H + 2 Hkv) D)
        if self.q_norm is None:  # q and k rotated together
            qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
            q, k = self.rope(qk.view(B, T, H + Hkv, D), positions, seq_dim=1).split([H, Hkv], dim=2)
        else:
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            if self.norm_per_head:
                q, k = self.q_norm(q.view(B, T, H, D)), self.k_norm(k.view(B, T, Hkv, D))
            else:
                q, k = self.q_norm(q).view(B, T, H, D), self.k_norm(k).view(B, T, Hkv, D)
            q, k = self.rope(q, positions, seq_dim=1), self.rope(k, positions, seq_dim=1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.reshape(B, T, Hkv, D).transpose(1, 2)
        real_keys = None
        if state is not None:
            k, v = state.append(k, v)  # (B, Hkv, offset + T, D)
            real_keys = state.real_keys(offset + T)
        y = attend(q, k, v, offset, self.backend, real_keys)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0,
           backend: Backend = "auto", real_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q: (B, H, T, D)`` at positions ``offset..offset+T-1`` over
    ``k, v: (B, Hkv, offset + T, D)``; returns ``(B, H, T, D)``.

    ``real_keys (B, offset + T)`` (left-padded rows, see :class:`zoo.blocks.state.DecodingState`) masks
    the keys where it is False; a pad query sees only itself, so no row of the softmax is empty. Masked
    attention runs on sdpa whatever the backend (eager stays eager)."""
    if real_keys is not None:
        mask = padded_causal_mask(q.shape[2], k.shape[2], offset, real_keys)  # (B, 1, T, S)
        if backend == "eager":
            return _eager_attention(q, k, v, offset, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if backend == "auto":
        backend = "xformers" if q.is_cuda and _has_xformers() else "sdpa"
    if backend == "eager":
        return _eager_attention(q, k, v, offset)
    if backend == "xformers":
        return _xformers_attention(q, k, v, offset)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose auto, sdpa, eager or xformers")
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, S, offset, q.device), enable_gqa=gqa)


def _causal_mask(T: int, S: int, offset: int, device) -> torch.Tensor:
    """Boolean ``(T, S)``: query i (absolute position offset + i) may see keys at positions <= it."""
    return torch.arange(S, device=device)[None, :] <= torch.arange(offset, offset + T, device=device)[:, None]


def padded_causal_mask(T: int, S: int, offset: int, real_keys: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, 1, T, S)``: the causal mask without the pad keys (``real_keys (B, S)`` False), except
    that every query sees its own position (a pad query would otherwise see nothing and give NaN)."""
    causal = _causal_mask(T, S, offset, real_keys.device)
    own = torch.arange(S, device=real_keys.device)[None, :] == torch.arange(offset, offset + T, device=real_keys.device)[:, None]
    return (causal & real_keys[:, None, None, :]) | own


def _eager_attention(q, k, v, offset, mask=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    mask = _causal_mask(q.shape[2], k.shape[2], offset, q.device) if mask is None else mask
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _xformers_attention(q, k, v, offset):
    xops = _import_xformers()
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # xformers takes (B, M, G, H, K) for grouped heads: G = K/V groups, H = query heads per group.
    q5 = q.transpose(1, 2).reshape(B, T, Hkv, H // Hkv, D)
    k5 = k.transpose(1, 2)[:, :, :, None].expand(B, S, Hkv, H // Hkv, D)
    v5 = v.transpose(1, 2)[:, :, :, None].expand(B, S, Hkv, H // Hkv, D)
    bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if T > 1 else None
    y = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)  # (B, T, Hkv, H/Hkv, D)
    return y.reshape(B, T, H, D).transpose(1, 2)


@functools.cache
def _has_xformers() -> bool:
    try:
        _import_xformers()
    except ConfigError:
        return False
    return True


def _import_xformers():
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise ConfigError("backend 'xformers' needs the xformers package (pip install 'zoo[gpu]'); "
                          "use backend: auto or sdpa") from err
    return xops
