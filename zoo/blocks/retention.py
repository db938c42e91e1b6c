"""Multi-scale retention, the token mixer of RetNet (Sun et al. 2023, arXiv 2307.08621, §2.1-2.2).

Per head ``h``: ``Q = (X W_Q) ⊙ Θ``, ``K = (X W_K) ⊙ Θ̄`` (Eq. 3: rotary relative positions, the
xPos-style rotation, here :class:`zoo.blocks.rope.RotaryEmbedding`), ``V = X W_V`` with a value width
``value_factor * d_model`` (2 in the paper), and ``retention(X) = (Q K^T ⊙ D) V`` with
``D[n, m] = gamma_h^(n - m)`` (Eq. 5). Heads decay at different rates (Eq. 8): ``gamma_h = 1 - 2^(-5-h)``
(``decay: power2``) or the paper's LM variant (as in its released code)
``1 - exp(linspace(log 1/32, log 1/512, H))`` (``decay: loglinear``). Outputs are normalised per head
(GroupNorm as in Eq. 8, or RMSNorm), gated by ``swish(X W_G)`` and projected back:
``MSR(X) = (swish(X W_G) ⊙ Y) W_O`` (Eq. 8).

The three forms of :mod:`zoo.blocks.retention_ops` compute the same function, so ``mode`` is a speed
choice: ``parallel`` (Eq. 5, O(T^2) memory), ``chunkwise`` (Eq. 7, O(T * chunk_size)), and ``auto``
(parallel up to ``AUTO_PARALLEL_MAX_LEN`` tokens, chunkwise beyond). Keys are scaled by ``1/sqrt(Dk)``; the
paper's further normalisations of D and of the retention scores (§2.2) are omitted: each rescales a
head's output at each position by a positive factor, which the per-head, per-position norm undoes up to
its eps, and leaving them out lets every form feed the norm identical values (so eps cannot break
parallel/recurrent parity).

Decoding (``forward(x, state)``): ``T == 1`` uses the recurrent form (Eq. 6), ``T > 1`` (prefill,
speculative verification) the chunkwise form started from the state. The state holds one float32
``(Dk, Dv)`` matrix per head and the position count, whatever the context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.retention_ops import chunkwise_retention, parallel_retention, recurrent_retention, state_dtype
from zoo.blocks.rope import RotaryEmbedding
from zoo.blocks.state import DecodingState
from zoo.errors import ConfigError, require_positive
from zoo.registry import BlockContext, register

# Longest sequence for which ``mode: auto`` uses the parallel form: where chunkwise starts to win
# (``python -m benchmarks.bench_retention`` measures the crossover; README, RetNet section, has the figures).
AUTO_PARALLEL_MAX_LEN = 256


@dataclass
class RetentionConfig:
    n_heads: int = 4
    value_factor: int = 2  # value (and gate) width = value_factor * d_model (paper: 2)
    decay: Literal["power2", "loglinear"] = "power2"
    norm: Literal["groupnorm", "rmsnorm"] = "groupnorm"
    norm_eps: float = 1.0e-6
    rope_theta: float = 10000.0
    mode: Literal["auto", "parallel", "chunkwise"] = "auto"
    chunk_size: int = 64

    def validate(self, model) -> None:
        require_positive(self, "n_heads", "value_factor", "norm_eps", "rope_theta", "chunk_size")
        if model.d_model % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} does not divide model.d_model={model.d_model}")
        if (model.d_model // self.n_heads) % 2:
            raise ConfigError(f"rotary positions need an even key dimension per head, got "
                              f"d_model / n_heads = {model.d_model // self.n_heads}")


class RetentionSnapshot(NamedTuple):
    recurrent: torch.Tensor
    length: int


class RetentionState(DecodingState):
    """Decoding state of one retention layer: ``recurrent: (B, H, Dk, Dv)`` and ``length``, the
    number of tokens seen (the rotary offset of the next one).

    The recurrent state is float32 (float64 for float64 models) whatever the model's dtype, and its
    size does not depend on the context length. ``forward`` advances the state by replacing
    ``recurrent`` with a new tensor and never writes into the old one, so ``snapshot()`` only keeps
    references (no copy) and ``restore(snapshot)`` rolls back to it: a speculative decoder snapshots
    before feeding drafted tokens, and on rejection restores and feeds the accepted ones again (the
    recurrent matrix mixes all positions, so it cannot rewind).
    """

    def __init__(self, recurrent: torch.Tensor, length: int = 0):
        self.recurrent = recurrent
        self.length = length

    def snapshot(self) -> RetentionSnapshot:
        return RetentionSnapshot(self.recurrent, self.length)

    def restore(self, snapshot: RetentionSnapshot) -> None:
        self.recurrent, self.length = snapshot.recurrent, snapshot.length


def head_log_decays(n_heads: int, decay: str) -> list[float]:
    """``log(gamma_h)`` per head, computed in float64."""
    if decay == "power2":
        return [math.log1p(-2.0 ** (-5 - h)) for h in range(n_heads)]
    if decay == "loglinear":
        # On the CPU whatever the default device: a model built on meta still needs the numbers.
        rates = torch.linspace(math.log(1 / 32), math.log(1 / 512), n_heads, dtype=torch.float64, device="cpu").exp()
        return torch.log1p(-rates).tolist()
    raise ValueError(f"unknown decay {decay!r}; choose power2 or loglinear")


@register("mixer", "retention", config=RetentionConfig)
class MultiScaleRetention(nn.Module):
    """Gated multi-scale retention (Eq. 8): ``(B, T, d_model) -> (B, T, d_model)``, causal."""

    def __init__(self, config: RetentionConfig, ctx: BlockContext):
        super().__init__()
        self.n_heads = config.n_heads
        self.key_dim = ctx.d_model // config.n_heads
        self.value_dim = config.value_factor * ctx.d_model // config.n_heads
        self.mode, self.chunk_size = config.mode, config.chunk_size
        self.norm_type, self.norm_eps = config.norm, config.norm_eps
        width_k, width_v = self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.split = [width_k, width_k, width_v, width_v]  # q, k, v, gate
        self.proj = nn.Linear(ctx.d_model, sum(self.split), bias=False)
        self.out = nn.Linear(width_v, ctx.d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.empty(width_v))
        self.norm_bias = nn.Parameter(torch.empty(width_v)) if config.norm == "groupnorm" else None
        self.rope = RotaryEmbedding(self.key_dim, config.rope_theta)
        # Kept as Python floats, not a buffer: model.to(bfloat16) would round 1 - 2^-9 to 1.
        self.log_decays = head_log_decays(config.n_heads, config.decay)
        self._log_gamma_cache: dict[tuple, torch.Tensor] = {}
        self.init_std, self.out_std = ctx.init_std, ctx.residual_init_std

    def init_own_weights(self) -> None:
        """Projections from ``N(0, init_std)`` (the output one depth-scaled); the per-head norm's gain 1, bias 0."""
        nn.init.normal_(self.proj.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.out_std)
        nn.init.ones_(self.norm_weight)
        if self.norm_bias is not None:
            nn.init.zeros_(self.norm_bias)

    def init_state(self, batch_size: int, max_len: int, device, dtype) -> RetentionState:
        """A zero recurrent state; ``max_len`` is not needed (the state does not grow)."""
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return RetentionState(torch.zeros(shape, device=device, dtype=state_dtype(dtype)))

    def forward(self, x: torch.Tensor, state: RetentionState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v, gate = self.proj(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.key_dim).transpose(1, 2)  # (B, H, T, Dk)
        k = k.view(B, T, self.n_heads, self.key_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.value_dim).transpose(1, 2)  # (B, H, T, Dv)
        positions = state.positions() if state is not None else 0  # per row where rows are left-padded
        q, k = self.rope(q, positions), self.rope(k, positions) * self.key_dim ** -0.5
        real = state.real_keys(state.length + T) if state is not None else None
        if real is not None:  # a pad's key is zero, so it never enters the recurrent state (which, zero
            k = k * real[:, None, -T:, None].to(k.dtype)  # before a row's first real token, decays to zero)
        y = self._retain(q, k, v, state)  # (B, H, T, Dv)
        y = self._head_norm(y.transpose(1, 2)).to(gate.dtype)  # (B, T, H * Dv)
        return self.out(F.silu(gate) * y)

    def _retain(self, q, k, v, state: RetentionState | None) -> torch.Tensor:
        T = q.shape[2]
        log_gamma = self._log_gamma(q.device, state_dtype(q.dtype))
        short = self.mode == "parallel" or (self.mode == "auto" and T <= AUTO_PARALLEL_MAX_LEN)
        if state is None:
            if short:
                return parallel_retention(q, k, v, log_gamma)
            return chunkwise_retention(q, k, v, log_gamma, self.chunk_size)[0]
        if T == 1:
            y, state.recurrent = recurrent_retention(q, k, v, log_gamma, state.recurrent)
        else:
            y, state.recurrent = chunkwise_retention(q, k, v, log_gamma, T if short else self.chunk_size,
                                                     state.recurrent)
        state.length += T
        return y

    def _log_gamma(self, device, dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._log_gamma_cache:
            self._log_gamma_cache[key] = torch.tensor(self.log_decays, device=device, dtype=dtype)
        return self._log_gamma_cache[key]

    def _head_norm(self, y: torch.Tensor) -> torch.Tensor:
        """Normalise ``(B, T, H, Dv)`` per head in float32 (float64 stays), affine; ``-> (B, T, H * Dv)``."""
        B, T, H, Dv = y.shape
        y = y.to(state_dtype(y.dtype))
        weight = self.norm_weight.to(y.dtype)
        if self.norm_bias is None:
            return F.rms_norm(y, (Dv,), eps=self.norm_eps).flatten(-2) * weight
        y = F.group_norm(y.reshape(B * T, H * Dv), H, weight, self.norm_bias.to(y.dtype), self.norm_eps)
        return y.view(B, T, H * Dv)
