"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3) and DoRA (Liu et al.
2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", Eq. 5) on a model's linear layers.

LoRA: ``h = W0 x + (alpha / r) B A x`` with ``A (r, in)`` drawn Kaiming-uniform and ``B (out, r)`` zero, so
the adapted model starts as its base (Hu et al. §4.1). DoRA: ``W' = m (W0 + s B A) / ||W0 + s B A||_c`` with
the magnitude ``m`` initialised to ``||W0||_c``; the norm is taken per output feature (each row of the
``(out, in)`` weight), as ``peft`` takes it, and detached from the graph (Liu et al. §4.3), so it only scales.

A fused projection (attention ``qkv``, SwiGLU ``gate_up``, retention ``proj``) gets one factor pair per
logical projection: ``lora_A (P r, in)`` stacks the ``A_p`` and ``lora_B (out, r)`` stacks the ``B_p`` by the
rows of part ``p``, so ``delta = blockdiag(B_1 .. B_P) A x``, one-to-one with separate LoRA on
``q_proj, k_proj, v_proj`` (``gate_proj, up_proj``) in the transformers layout.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters.base import AdapterModule, adopt, freeze
from zoo.adapters.experts import LoRAExperts
from zoo.adapters.nf4 import dense_weight, quantize_linear
from zoo.adapters.tokens import check_token_ids, train_token_rows
from zoo.blocks.attention import Attention
from zoo.blocks.experts import Experts
from zoo.blocks.mlp import SwiGLU
from zoo.blocks.retention import MultiScaleRetention
from zoo.errors import ConfigError, require_positive
from zoo.registry import register

# The attention, retention and MLA projections of every mixer, the dense and shared-expert SwiGLU
# projections and the packed routed experts, in the main layers and the MTP modules; not the routers,
# the shared-expert gate, the embedding or the output head.
DEFAULT_TARGETS = ("*mixer.qkv", "*mixer.out", "*mixer.proj", "*mixer.q_proj", "*mixer.q_down", "*mixer.q_up",
                   "*mixer.kv_down", "*mixer.kv_up", "*ffn.gate_up", "*ffn.down", "*ffn.shared.gate_up",
                   "*ffn.shared.down", "*ffn.experts")


@dataclass
class LoRAConfig:
    """``model.adapter: {type: lora, ...}``."""

    r: int = 8  # rank of each factor pair
    alpha: float = 16.0  # the update is scaled by alpha / r (Hu et al. §4.1)
    dropout: float = 0.0  # on the input of the low-rank path
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # fnmatch globs over module names
    dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024)
    base_quant: Literal["none", "nf4"] = "none"  # QLoRA: frozen base linears in 4-bit NormalFloat
    trainable_tokens: list[int] = field(default_factory=list)  # ids whose embedding/output rows train too

    def validate(self) -> None:
        require_positive(self, "r", "alpha")
        check_token_ids(self.trainable_tokens)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("targets is empty: name at least one module glob (default: attention and MLP "
                              f"projections {', '.join(DEFAULT_TARGETS)})")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def logical_parts(parent: nn.Module, name: str, linear: nn.Linear) -> tuple[int, ...]:
    """Output sizes of the logical projections fused in ``parent``'s child linear ``name``: ``(q, k, v)``
    of attention's ``qkv``, ``(gate, up)`` of a SwiGLU's ``gate_up``, ``(q, k, v, gate)`` of retention's
    ``proj``; a single part for any other linear."""
    if isinstance(parent, Attention) and name == "qkv":
        q, kv = parent.n_heads * parent.head_dim, parent.n_kv_heads * parent.head_dim
        return (q, kv, kv)
    if isinstance(parent, SwiGLU) and name == "gate_up":
        return (parent.d_hidden, parent.d_hidden)
    if isinstance(parent, MultiScaleRetention) and name == "proj":
        return tuple(parent.split)
    return (linear.out_features,)


def block_diagonal(B: torch.Tensor, parts: Sequence[int]) -> torch.Tensor:
    """``(out, r)`` stacked factors -> ``(out, P r)``: part ``p``'s rows times the ``p``-th block of ``r``."""
    return B if len(parts) == 1 else torch.block_diag(*B.split(list(parts)))


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W||_c`` of DoRA as peft computes it: the L2 norm of each output feature's row, over the last dim."""
    return torch.linalg.vector_norm(weight, dim=-1)


class LoRALinear(nn.Linear, AdapterModule):
    """An ``nn.Linear`` with LoRA (optionally DoRA) factors; its ``weight`` and ``bias`` are the frozen base's
    own tensors (same state-dict names), the factors ``lora_A (P r, in)``, ``lora_B (out, r)`` and DoRA's
    ``lora_magnitude (out,)``. ``forward(x (..., in)) -> (..., out)``."""

    ADAPTER_PARAMETERS = ("lora_",)

    @classmethod
    def wrap(cls, linear: nn.Linear, parts: Sequence[int], config: LoRAConfig) -> "LoRALinear":
        """``linear`` adapted: its tensors shared, fresh factors (``A`` Kaiming-uniform as peft, ``B`` zero)."""
        module = adopt(cls, linear)
        module.parts, module.scaling, module.dora = tuple(parts), config.scaling, config.dora
        like = {"dtype": module.weight.dtype, "device": module.weight.device}  # an NF4 weight reports its original dtype
        module.lora_A = nn.Parameter(torch.empty(len(parts) * config.r, linear.in_features, **like))
        for block in module.lora_A.data.split(config.r):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        module.lora_B = nn.Parameter(torch.zeros(linear.out_features, config.r, **like))
        module.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        if config.dora:
            module.lora_magnitude = nn.Parameter(row_norm(dense_weight(module.weight).detach()).clone())
        return module

    def delta_weight(self) -> torch.Tensor:
        """``s blockdiag(B) A``: the LoRA update of the weight, ``(out, in)``."""
        return self.scaling * block_diagonal(self.lora_B, self.parts) @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear on an NF4 weight is torchao's: dequantised on the fly, only the 4-bit weight kept for backward.
        if not self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        u = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., P r)
        delta = self.scaling * F.linear(u, block_diagonal(self.lora_B, self.parts).to(x.dtype))  # (..., out)
        if not self.dora:
            return F.linear(x, self.weight, self.bias) + delta
        with torch.no_grad():
            weight = dense_weight(self.weight)
            norm = row_norm(weight + self.delta_weight().to(weight.dtype))
        scale = self.lora_magnitude / norm  # (out,)
        out = scale.to(x.dtype) * (F.linear(x, self.weight) + delta)
        return out if self.bias is None else out + self.bias

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            weight = dense_weight(self.weight)
            weight = weight + self.delta_weight().to(weight.dtype)
            if self.dora:
                weight = weight * (self.lora_magnitude / row_norm(weight))[:, None]
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        return linear


@register("adapter", "lora", config=LoRAConfig)
class LoRA:
    """The ``lora`` adapter: freezes the model and adapts each target ``nn.Linear`` (:class:`LoRALinear`) and
    packed ``Experts`` (:class:`zoo.adapters.experts.LoRAExperts`); ``base_quant: nf4`` first stores the
    frozen base linears in NF4 (QLoRA, Dettmers et al. 2023 §3); ``trainable_tokens`` trains the embedding
    and output rows of those ids too (:mod:`zoo.adapters.tokens`)."""

    def __init__(self, config: LoRAConfig):
        self.config = config

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        adapted = []
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                qualified = f"{parent_name}.{name}" if parent_name else name
                if not any(fnmatch.fnmatchcase(qualified, p) for p in self.config.targets):
                    continue
                if type(child) is nn.Linear:
                    if self.config.base_quant == "nf4":
                        child = quantize_linear(child)
                    new = LoRALinear.wrap(child, logical_parts(parent, name, child), self.config)
                elif type(child) is Experts:
                    new = LoRAExperts.wrap(child, self.config.r, self.config.scaling, self.config.dropout,
                                           self.config.dora)
                else:
                    continue  # a glob may match norms or cores around the projections
                setattr(parent, name, new)
                adapted.append(qualified)
        if not adapted:
            raise ConfigError(f"model.adapter.targets: {self.config.targets} match no nn.Linear or packed experts "
                              f"of the model; its linears are e.g. "
                              f"{[n for n, m in model.named_modules() if type(m) is nn.Linear][:6]}")
        if self.config.trainable_tokens:
            train_token_rows(model, self.config.trainable_tokens)
        return model
