"""LoRA and DoRA on packed MoE experts: per-expert low-rank factors over the ``(E, ...)`` weights.

Each expert ``e`` gets its own pairs, one per logical projection as transformers' per-expert modules have
them: ``gate`` and ``up`` (``lora_A_gate_up (E, 2 r, d)``, ``lora_B_gate_up (E, 2 I, r)``, gate rows first as
in ``gate_up_proj``) and ``down`` (``lora_A_down (E, r, I)``, ``lora_B_down (E, d, r)``), so expert ``e``
computes ``W_e x + s B_e A_e x`` (Hu et al. 2021, Eq. 3). The rows, sorted by expert as
:mod:`zoo.blocks.experts` sorts them, go through every expert's base and low-rank GEMMs as grouped GEMMs
(``torch._grouped_mm``), never a Python loop over experts; where that is missing or lacks the dtype
(float64), the same per-expert fallback the experts use runs instead.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters.base import AdapterModule, adopt
from zoo.blocks.experts import CPU_ROW_ALIGN, Experts, Sorted, pad_groups


def _grouped(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``a (S, in)`` rows sorted by expert times ``w (E, out, in)`` transposed per group: ``(S, out)``."""
    return torch._grouped_mm(a.contiguous(), w.transpose(1, 2), offs=offsets)


def _looped(a: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The per-expert fallback of :func:`_grouped`."""
    return torch.cat([F.linear(chunk, w[e]) for e, chunk in enumerate(a.split(counts))])


def _pad_rank(factor: torch.Tensor, dim: int, n_parts: int, multiple: int) -> torch.Tensor:
    """``factor`` with each part's rank (a block of ``dim``) zero-padded to a multiple of ``multiple``: the
    product of padded factors is unchanged, and grouped GEMMs need rows of a multiple of 16 bytes."""
    r = factor.shape[dim] // n_parts
    extra = -r % multiple
    if not extra:
        return factor
    parts = factor.chunk(n_parts, dim=dim)
    pad = [0, 0] * (factor.dim() - 1 - dim % factor.dim()) + [0, extra]
    return torch.cat([F.pad(part, pad) for part in parts], dim=dim)


def _lowrank_delta(A: torch.Tensor, B: torch.Tensor, n_parts: int) -> torch.Tensor:
    """``blockdiag(B_e) A_e`` for every expert: ``(E, out, in)``."""
    return torch.cat([b @ a for a, b in zip(A.chunk(n_parts, dim=1), B.chunk(n_parts, dim=1))], dim=1)


class LoRAExperts(Experts, AdapterModule):
    """Packed experts with per-expert LoRA (and DoRA: ``lora_magnitude_gate_up (E, 2 I)``,
    ``lora_magnitude_down (E, d)``, each expert's row norms). ``forward(x (N, d), pairs) -> (N, d)``
    as :class:`~zoo.blocks.experts.Experts`."""

    ADAPTER_PARAMETERS = ("lora_",)
    PARTS = {"gate_up": 2, "down": 1}

    @classmethod
    def wrap(cls, experts: Experts, r: int, scaling: float, dropout: float, dora: bool) -> "LoRAExperts":
        """``experts`` adapted: its tensors shared, fresh factors (``A`` Kaiming-uniform, ``B`` zero)."""
        module = adopt(cls, experts)
        module.scaling, module.dora = scaling, dora
        module.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        for name, n_parts in cls.PARTS.items():
            weight = getattr(module, f"{name}_proj")  # (E, out, in)
            E, out, fan_in = weight.shape
            A = torch.empty(E, n_parts * r, fan_in, dtype=weight.dtype, device=weight.device)
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) of an (r, in) factor, as peft
            setattr(module, f"lora_A_{name}", nn.Parameter(A.uniform_(-bound, bound)))
            setattr(module, f"lora_B_{name}", nn.Parameter(torch.zeros(E, out, r, dtype=weight.dtype,
                                                                       device=weight.device)))
            if dora:
                setattr(module, f"lora_magnitude_{name}",
                        nn.Parameter(torch.linalg.vector_norm(weight.detach(), dim=-1).clone()))
        return module

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s blockdiag(B_e) A_e`` of projection ``name`` (``gate_up`` or ``down``) for every expert."""
        return self.scaling * _lowrank_delta(getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}"),
                                            self.PARTS[name])

    def forward(self, x: torch.Tensor, pairs: Sorted) -> torch.Tensor:
        if not self.adapter_enabled:
            return super().forward(x, pairs)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if self._use_grouped_mm(dtype):
            if x.device.type == "cpu":
                pairs = pad_groups(pairs, x.shape[0], CPU_ROW_ALIGN)
            mm = partial(_grouped, offsets=pairs.offsets)
        else:
            mm = partial(_looped, counts=pairs.counts.tolist())
        expert = torch.repeat_interleave(torch.arange(self.n_experts, device=x.device), pairs.counts)  # (S,)
        rows = F.pad(x.to(dtype), (0, 0, 0, 1))[pairs.token]  # (S, d); row N is zero (padding)
        gate, up = self._project("gate_up", rows, mm, expert).chunk(2, dim=-1)  # (S, I) each
        y = self._project("down", F.silu(gate) * up, mm, expert)  # (S, d)
        out = torch.zeros((x.shape[0] + 1, x.shape[1]), dtype=torch.promote_types(x.dtype, torch.float32),
                          device=x.device)
        return out.index_add_(0, pairs.token, y.to(out.dtype) * pairs.weight[:, None].to(out.dtype))[:-1]

    def _project(self, name: str, rows: torch.Tensor, mm, expert: torch.Tensor) -> torch.Tensor:
        """``rows (S, in)`` through every row's expert's adapted projection ``name``: ``(S, out)``."""
        dtype = rows.dtype
        weight = getattr(self, f"{name}_proj")
        A, B = getattr(self, f"lora_A_{name}").to(dtype), getattr(self, f"lora_B_{name}").to(dtype)
        n_parts = self.PARTS[name]
        if isinstance(mm, partial) and mm.func is _grouped:
            multiple = max(1, 16 // rows.element_size())
            A, B = _pad_rank(A, 1, n_parts, multiple), _pad_rank(B, 2, 1, multiple)
        u = mm(self.lora_dropout(rows), A)  # (S, P r)
        lora = torch.cat([mm(u_p, B_p) for u_p, B_p in zip(u.chunk(n_parts, dim=-1), B.chunk(n_parts, dim=1))],
                         dim=-1)  # (S, out)
        h = mm(rows, weight.to(dtype)) + self.scaling * lora
        if not self.dora:
            return h
        with torch.no_grad():  # the norm is a constant of the gradient (Liu et al. 2024 §4.3)
            norm = torch.linalg.vector_norm(weight + self.delta_weight(name).to(weight.dtype), dim=-1)  # (E, out)
        scale = getattr(self, f"lora_magnitude_{name}") / norm
        return h * scale.to(dtype)[expert]

    def merged(self) -> Experts:
        with torch.device("meta"):
            experts = Experts(self.n_experts, self.gate_up_proj.shape[2], self.d_hidden, self.init_std,
                              self.out_std, self.dispatch)
        with torch.no_grad():
            for name in self.PARTS:
                weight = getattr(self, f"{name}_proj") + self.delta_weight(name)
                if self.dora:
                    weight = weight * (getattr(self, f"lora_magnitude_{name}")
                                       / torch.linalg.vector_norm(weight, dim=-1))[..., None]
                setattr(experts, f"{name}_proj", nn.Parameter(weight))
        return experts
