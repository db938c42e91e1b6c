"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, §2.1; used unchanged by DeepSeek-V3).

Keys and values come from one low-rank latent per token, ``c_kv = RMSNorm(W_DKV h)`` (Eq. 9), expanded
per head as ``k_nope = W_UK c_kv`` and ``v = W_UV c_kv`` (Eq. 10-11). Rotary positions cannot pass
through that compression, so a decoupled key ``k_rope = RoPE(W_KR h)`` (Eq. 15), shared by all heads,
is concatenated to every head's key, and each query gets its own rope part (Eq. 14, 16-19). Queries
may be compressed too (``q_lora_rank``, Eq. 12-13): ``q = W_UQ RMSNorm(W_DQ h)``.

The decoding cache holds only ``c_kv`` and ``k_rope``: ``kv_lora_rank + qk_rope_head_dim`` numbers per
token and layer instead of ``2 n_heads head_dim``. Decoding one token uses the absorbed form (§2.1.3):
``q_nope W_UK`` is scored directly against the cached latents and the attention-weighted latent goes
through ``W_UV``, so no full key or value is ever rebuilt. Prefill expands K and V and runs SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.attention import padded_causal_mask
from zoo.blocks.norm import RMSNorm
from zoo.blocks.rope import RotaryEmbedding
from zoo.blocks.state import PositionalCache
from zoo.errors import ConfigError, require_positive
from zoo.registry import BlockContext, register
from zoo.schema import BlockSpec


@dataclass
class MLAConfig:
    n_heads: int = 8
    q_lora_rank: int | None = None  # None: uncompressed queries (DeepSeek-V2-Lite); 1536 in DeepSeek-V3
    kv_lora_rank: int = 64  # d_c in the paper; 512 in DeepSeek-V2/V3
    qk_nope_head_dim: int = 32  # d_h; 128 in DeepSeek-V3
    qk_rope_head_dim: int = 16  # d_h^R; 64 in DeepSeek-V3
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    # {type: linear | dynamic | llama3 | yarn, ...} (zoo.blocks.rope); DeepSeek-V3 uses yarn
    rope_scaling: BlockSpec | None = field(default=None, metadata={"kind": "rope_scaling"})
    norm_eps: float = 1.0e-6  # of the latent RMSNorms q_norm, kv_norm only; DeepSeek-V2/V3 fix it at 1e-6
    # None: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim), times yarn's softmax_factor under yarn scaling
    softmax_scale: float | None = None

    def validate(self, model) -> None:
        require_positive(self, "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                         "v_head_dim", "rope_theta", "norm_eps", "softmax_scale")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for rotary positions, got {self.qk_rope_head_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling.options.validate()


class MLACache(PositionalCache):
    """The compressed decoding state: ``latent (B, max_len, kv_lora_rank)`` and ``k_rope (B, max_len,
    qk_rope_head_dim)`` of the ``length`` tokens seen so far; as for a KV cache, its snapshot is the
    length and rolling back only shortens it."""

    def __init__(self, batch_size: int, kv_lora_rank: int, rope_dim: int, max_len: int, device, dtype):
        self.latent = torch.empty(batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.empty(batch_size, max_len, rope_dim, device=device, dtype=dtype)
        self.length = 0

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + latent.shape[1]
        if end > self.latent.shape[1]:
            raise RuntimeError(f"MLA cache full: {end} positions needed, {self.latent.shape[1]} allocated")
        self.latent[:, self.length:end] = latent
        self.k_rope[:, self.length:end] = k_rope
        self.length = end
        return self.latent[:, :end], self.k_rope[:, :end]


@register("mixer", "mla", config=MLAConfig)
class MultiHeadLatentAttention(nn.Module):
    """Causal Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, §2.1): ``(B, T, d_model) ->
    (B, T, d_model)``.

    Implements Eq. 9-19 with an RMSNorm on each latent (as the released DeepSeek-V2/V3 models do,
    eps ``norm_eps``): the key/value latent ``c_kv = RMSNorm(W_DKV h)`` (Eq. 9) expands per head to
    ``k_C = W_UK c_kv`` and ``v_C = W_UV c_kv`` (Eq. 10-11); queries are ``q_C = W_UQ RMSNorm(W_DQ h)``
    (Eq. 12-13; one ``q_proj`` when ``q_lora_rank`` is None) with a rotary part ``q_R = RoPE(W_QR c_q)``
    (Eq. 14); the decoupled key ``k_R = RoPE(W_KR h)`` (Eq. 15) is shared by all heads, so ``q = [q_C;
    q_R]``, ``k = [k_C; k_R]`` (Eq. 16-17), ``o = softmax(q k^T / sqrt(d_h + d_h^R)) v_C`` (Eq. 18) and
    ``u = W_O o`` (Eq. 19). A rope scaling may multiply the default softmax scale (YaRN's
    ``m(mscale_all_dim)^2`` in DeepSeek-V2/V3, :meth:`zoo.blocks.rope.YarnScaling.softmax_factor`). With a
    decoding state only ``c_kv`` and ``k_R`` are cached, and one-token steps score against the latents with
    ``W_UK`` and ``W_UV`` absorbed (§2.1.2-2.1.3)."""

    def __init__(self, config: MLAConfig, ctx: BlockContext):
        super().__init__()
        self.n_heads = config.n_heads
        self.nope, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        scaling = config.rope_scaling.options if config.rope_scaling else None
        factor = scaling.softmax_factor() if scaling is not None else 1.0
        self.scale = config.softmax_scale or factor / math.sqrt(self.nope + self.rope_dim)
        q_dim = self.n_heads * (self.nope + self.rope_dim)
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(ctx.d_model, q_dim, bias=False)
        else:
            self.q_down = nn.Linear(ctx.d_model, config.q_lora_rank, bias=False)  # W_DQ
            self.q_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
            self.q_up = nn.Linear(config.q_lora_rank, q_dim, bias=False)  # W_UQ and W_QR
        self.kv_down = nn.Linear(ctx.d_model, self.kv_lora_rank + self.rope_dim, bias=False)  # W_DKV and W_KR
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.norm_eps)
        self.kv_up = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)  # W_UK, W_UV
        self.out = nn.Linear(self.n_heads * self.v_dim, ctx.d_model, bias=False)
        self.rope = RotaryEmbedding(self.rope_dim, config.rope_theta, scaling)
        self.init_std, self.out_std = ctx.init_std, ctx.residual_init_std

    def init_own_weights(self) -> None:
        for name, linear in self.named_children():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=self.out_std if name == "out" else self.init_std)

    def init_state(self, batch_size: int, max_len: int, device, dtype) -> MLACache:
        """The decoding state: the compressed latent and the shared rope key of every position."""
        return MLACache(batch_size, self.kv_lora_rank, self.rope_dim, max_len, device, dtype)

    def forward(self, x: torch.Tensor, state: MLACache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope_dim).transpose(1, 2)  # (B, H, T, dn + dr)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_down(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)  # (B, T, r)
        offset = state.length if state is not None else 0
        positions = state.positions() if state is not None else 0  # per row where rows are left-padded
        q_rope = self.rope(q_rope, positions)
        k_rope = self.rope(k_rope[:, None], positions)[:, 0]  # (B, T, dr), one head shared by all
        real_keys = None
        if state is not None:
            latent, k_rope = state.append(latent, k_rope)  # (B, S, r), (B, S, dr) with S = offset + T
            real_keys = state.real_keys(offset + T)
        if state is not None and T == 1:
            y = self._absorbed(q_nope, q_rope, latent, k_rope, real_keys)
        else:
            y = self._expanded(q_nope, q_rope, latent, k_rope, offset, real_keys)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def _expanded(self, q_nope, q_rope, latent, k_rope, offset: int, real_keys=None) -> torch.Tensor:
        """Rebuild per-head K, V from the latents (Eq. 10-11, 17) and attend; ``(B, H, T, dv)``; pad keys
        (``real_keys (B, S)`` False) are masked as in :func:`zoo.blocks.attention.padded_causal_mask`."""
        B, S, _ = latent.shape
        T = q_nope.shape[2]
        kv = self.kv_up(latent).view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, S, dn), (B, H, S, dv)
        k = torch.cat((k_nope, k_rope[:, None].expand(B, self.n_heads, S, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        if real_keys is not None:
            mask = padded_causal_mask(T, S, offset, real_keys)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        if offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(offset, offset + T, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, real_keys=None) -> torch.Tensor:
        """One new token against every cached latent, with W_UK and W_UV absorbed (§2.1.3); ``(B, H, 1, dv)``;
        pad latents (``real_keys (B, S)`` False) get no weight."""
        w = self.kv_up.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # (H, dn, r), (H, dv, r)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, 1, r)
        scores = q_latent @ latent[:, None].transpose(-2, -1) + q_rope @ k_rope[:, None].transpose(-2, -1)
        if real_keys is not None:
            scores = scores.masked_fill(~real_keys[:, None, None, :], float("-inf"))
        probs = (scores.float() * self.scale).softmax(dim=-1).to(latent.dtype)  # (B, H, 1, S)
        return torch.einsum("bhtr,hvr->bhtv", probs @ latent[:, None], w_uv)
