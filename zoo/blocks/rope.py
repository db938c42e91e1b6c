"""Rotary position embedding (Su et al. 2021, "RoFormer", arXiv 2104.09864, Eq. 34) and its context-extension
scalings.

Pairs ``(x_i, x_{i + d/2})`` are rotated by angle ``pos * f_i`` with ``f_i = theta^(-2i/d)`` (the "half" layout
of GPT-NeoX and Llama, so imported checkpoints need no permutation); ``q . k`` then depends only on the
relative position. The cos/sin tables are computed in float64 and kept out of the module's buffers,
so ``model.to(torch.bfloat16)`` never rounds them; the rotation runs in float32 (float64 for float64
inputs) as one autograd node, four elementwise passes forward and four backward.

A scaling (``mixer.rope_scaling: {type: ..., ...}``, registry kind ``rope_scaling``) changes the frequencies
``f_i`` and may multiply cos and sin by an attention factor; its fields are those of transformers'
``rope_parameters`` for the same ``rope_type``, one to one:

* ``linear``: position interpolation, ``f_i / factor``.
* ``dynamic``: dynamic NTK, a larger base once the sequence outgrows ``original_max_position_embeddings``.
* ``llama3``: Llama 3.1's per-wavelength interpolation.
* ``yarn``: YaRN's NTK-by-parts frequencies and attention temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from zoo.errors import ConfigError, require_positive
from zoo.registry import register


class RopeScaling:
    """What a registered rope scaling provides. ``inv_freq`` maps the unscaled frequencies ``theta^(-2i/d)``
    (float64, ``(d/2,)``) of a head of ``d = 2 * len(base)`` dims to the scaled ones for a sequence of
    ``length`` positions; ``cos_sin_factor`` multiplies cos and sin (so ``q . k`` by its square); the
    frequencies depend on ``length`` only beyond ``fixed_up_to`` positions."""

    TYPE: str = ""  # the registered name, set by the registration
    fixed_up_to: float = math.inf
    REQUIRED: tuple[str, ...] = ("factor",)

    def inv_freq(self, base: torch.Tensor, theta: float, length: int) -> torch.Tensor:
        raise NotImplementedError

    def cos_sin_factor(self) -> float:
        return 1.0

    def softmax_factor(self) -> float:
        """A factor multi-head latent attention applies to its default softmax scale."""
        return 1.0

    def validate(self) -> None:
        for name in self.REQUIRED:
            if getattr(self, name) is None:
                raise ConfigError(f"rope_scaling.{name} is required by rope scaling type {self.TYPE!r} "
                                  f"(required: {', '.join(self.REQUIRED)})")
        try:
            require_positive(self, *(f for f in vars(self) if isinstance(getattr(self, f), (int, float))
                                     and not isinstance(getattr(self, f), bool)))
        except ConfigError as err:
            raise ConfigError(f"rope_scaling.{err}") from None


def _scaling(name: str):
    def decorator(cls):
        cls.TYPE = name
        return register("rope_scaling", name, config=cls)(cls)
    return decorator


@_scaling("linear")
@dataclass
class LinearScaling(RopeScaling):
    """Position interpolation (Chen et al. 2023, arXiv 2306.15595, §2.2): position ``m`` is read as
    ``m / factor``, i.e. every frequency is divided by ``factor``."""

    factor: float | None = None

    def inv_freq(self, base, theta, length):
        return base / self.factor


@_scaling("dynamic")
@dataclass
class DynamicScaling(RopeScaling):
    """Dynamic NTK scaling (Peng et al. 2023, "YaRN", arXiv 2309.00071, §3.1 NTK-aware base change and §3.3
    dynamic scaling): for a sequence of ``L > L0 = original_max_position_embeddings`` positions the base
    becomes ``theta * (factor L / L0 - (factor - 1))^(d / (d - 2))``; up to ``L0`` the rope is unscaled.

    ``original_max_position_embeddings`` is transformers' top-level ``max_position_embeddings`` (its
    ``dynamic`` rope parameters hold ``factor`` only). A forward over positions ``offset .. offset + T - 1``
    uses the frequencies of ``L = offset + T``: a full forward equals transformers', and so does cached
    decoding, where each new token is rotated with the frequencies of the length so far while the cached keys
    keep theirs (transformers recomputes its frequencies as the sequence grows in the same way)."""

    factor: float | None = None
    original_max_position_embeddings: int | None = None
    REQUIRED = ("factor", "original_max_position_embeddings")

    @property
    def fixed_up_to(self) -> float:
        return self.original_max_position_embeddings

    def inv_freq(self, base, theta, length):
        if length <= self.original_max_position_embeddings:
            return base
        d = 2 * base.numel()
        stretch = self.factor * length / self.original_max_position_embeddings - (self.factor - 1)
        return (theta * stretch ** (d / (d - 2))) ** (-2 * torch.arange(base.numel(), dtype=torch.float64) / d)


@_scaling("llama3")
@dataclass
class Llama3Scaling(RopeScaling):
    """Llama 3.1's frequency rule (Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv 2407.21783, as
    released by Meta): with ``L0 = original_max_position_embeddings`` and wavelength ``w = 2 pi / f``,
    frequencies of ``w < L0 / high_freq_factor`` are kept, those of ``w > L0 / low_freq_factor`` divided by
    ``factor``, and those between interpolated with ``s = (L0 / w - low_freq_factor) / (high_freq_factor -
    low_freq_factor)``: ``f ((1 - s) / factor + s)``."""

    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    REQUIRED = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

    def validate(self) -> None:
        super().validate()
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                              f"low_freq_factor={self.low_freq_factor}")

    def inv_freq(self, base, theta, length):
        old = self.original_max_position_embeddings
        wavelength = 2 * math.pi / base
        smooth = ((old / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor))
        scaled = base * ((1 - smooth) / self.factor + smooth)
        scaled = torch.where(wavelength > old / self.low_freq_factor, base / self.factor, scaled)
        return torch.where(wavelength < old / self.high_freq_factor, base, scaled)


@_scaling("yarn")
@dataclass
class YarnScaling(RopeScaling):
    """YaRN (Peng et al. 2023, arXiv 2309.00071): NTK-by-parts frequencies (§3.2) and an attention temperature
    (§3.4). Dimension ``i`` is interpolated (``f_i / factor``) or kept by the ramp ``r_i = clamp((i - lo) /
    (hi - lo), 0, 1)``: ``f_i (r_i / factor + 1 - r_i)``, where ``lo``, ``hi`` are the dims that turn
    ``beta_fast`` and ``beta_slow`` times in ``L0 = original_max_position_embeddings`` positions,
    ``d ln(L0 / (2 pi beta)) / (2 ln theta)`` (floored / ceiled with ``truncate``).

    cos and sin are multiplied by ``attention_factor``, by default ``m(mscale) / m(mscale_all_dim)`` when both
    are set, else ``m(1)``, with ``m(a) = 0.1 a ln(factor) + 1`` (§3.4, for ``factor > 1``). Multi-head latent
    attention (DeepSeek-V2/V3) also multiplies its softmax scale by :meth:`softmax_factor`, ``m(mscale_all_dim)^2``;
    the GQA attention block does not, as in transformers."""

    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    REQUIRED = ("factor", "original_max_position_embeddings")

    def validate(self) -> None:
        super().validate()
        if self.beta_fast <= self.beta_slow:
            raise ConfigError(f"rope_scaling.beta_fast={self.beta_fast} must exceed beta_slow={self.beta_slow}")

    def inv_freq(self, base, theta, length):
        d = 2 * base.numel()

        def dim_turning(turns: float) -> float:
            return d * math.log(self.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_turning(self.beta_fast), dim_turning(self.beta_slow)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        if lo == hi:
            hi += 0.001  # a step instead of a ramp
        ramp = ((torch.arange(base.numel(), dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        return base * (ramp / self.factor + 1 - ramp)

    def cos_sin_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_m(self.factor, self.mscale) / _yarn_m(self.factor, self.mscale_all_dim)
        return _yarn_m(self.factor, 1.0)

    def softmax_factor(self) -> float:
        """DeepSeek's extra factor on the MLA softmax scale: ``m(mscale_all_dim)^2`` (1 without it)."""
        return _yarn_m(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


def _yarn_m(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """Rotary positions over ``head_dim`` dims with base ``theta``, optionally scaled (a :class:`RopeScaling`)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.attention_factor = scaling.cos_sin_factor() if scaling is not None else 1.0
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self, length: int) -> torch.Tensor:
        """The float64 frequencies ``(head_dim / 2,)`` used for a sequence of ``length`` positions."""
        base = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        return base if self.scaling is None else self.scaling.inv_freq(base, self.theta, length)

    def _angles(self, start: int, end: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Eagerly on the CPU (one libm for every device); in a compiled graph on the device itself.
        where = device if torch.compiler.is_compiling() else "cpu"
        positions = torch.arange(start, end, dtype=torch.float64, device=where)
        angles = torch.outer(positions, self.inv_freq(length).to(where))  # (T, D/2)
        return ((angles.cos() * self.attention_factor).to(device, dtype),
                (angles.sin() * self.attention_factor).to(device, dtype))

    def _cos_sin(self, offset: int, T: int, device: torch.device, dtype: torch.dtype):
        end = offset + T
        # Computed afresh in a compiled graph (a cache filled on the first call would make Dynamo compile the
        # block a second time), and past a scaling's fixed range (frequencies of this length only).
        if torch.compiler.is_compiling() or (self.scaling is not None and end > self.scaling.fixed_up_to):
            return self._angles(offset, end, end, device, dtype)
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < end:
            length = max(end, 2 * cached[0].shape[0] if cached else 256)
            cached = self._angles(0, length, end, device, dtype)
            self._tables[key] = cached
        return cached[0][offset:end], cached[1][offset:end]

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0, seq_dim: int = -2) -> torch.Tensor:
        """Rotate ``x (..., D)`` whose positions run along ``seq_dim`` (``(B, H, T, D)`` by default,
        ``seq_dim=1`` for ``(B, T, H, D)``) and whose first position is ``offset``: an int, or a ``(B,)``
        tensor of per-row first positions for a batch-first ``x`` (left-padded rows; positions below 0,
        which only pads have, are rotated as position 0)."""
        seq_dim = seq_dim % x.dim()
        T = x.shape[seq_dim]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        broadcast = (T,) + (1,) * (x.dim() - seq_dim - 2) + (self.head_dim // 2,)
        if isinstance(offset, torch.Tensor):
            positions = (offset[:, None] + torch.arange(T, device=offset.device)).clamp(min=0)  # (B, T)
            cos, sin = self._cos_sin(0, int(positions.max()) + 1, x.device, dtype)
            broadcast = (x.shape[0],) + (1,) * (seq_dim - 1) + broadcast
            cos, sin = cos[positions].view(broadcast), sin[positions].view(broadcast)
        else:
            cos, sin = self._cos_sin(offset, T, x.device, dtype)
            cos, sin = cos.view(broadcast), sin.view(broadcast)
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
