"""Packed SwiGLU experts run as grouped GEMMs over tokens sorted by expert.

The routed ``(token, expert)`` pairs are sorted by expert (stable, so ties keep token order); each
expert's rows are then contiguous and both projections of every expert run as one grouped GEMM
(``torch._grouped_mm``, which has CPU and Hopper kernels in torch 2.13) with ``offs`` the cumulative
row counts. The expert outputs are weighted and summed back per token in float32 with ``index_add_``
over the sorted token ids (deterministic: a serial scatter on CPU). No Python loop over tokens; the
per-expert loop :func:`naive_experts` is the reference for tests and the fallback where
``_grouped_mm`` is missing or lacks the dtype (it takes float32, bfloat16 and float16 only).

Weights use transformers' packed layout: ``gate_up_proj (E, 2 I, d)`` with the gate rows first and
``down_proj (E, d, I)``, so ``y = down_proj[e] @ (silu(gate) * up)`` (SwiGLU, Shazeer 2020, Eq. 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Dispatch = Literal["auto", "grouped_mm", "loop"]
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Sorted:
    """Routed pairs sorted by expert: ``token (S,)`` source token of each row, ``weight (S,)`` its gate
    weight (float32), ``counts (E,)`` rows per expert and ``offsets (E,)`` their int32 cumulative sums."""

    token: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def sort_by_expert(indices: torch.Tensor, weights: torch.Tensor, n_experts: int,
                   capacity: int | None = None) -> Sorted:
    """Sort the pairs ``indices, weights (N, k)`` by expert; with ``capacity``, keep at most that
    many rows per expert, the earliest tokens first (Switch §2.2: the others are dropped)."""
    k = indices.shape[-1]
    flat = indices.flatten()
    expert, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        keep = torch.arange(flat.numel(), device=flat.device) - starts[expert] < capacity
        order = order[keep]
        counts = counts.clamp(max=capacity)
    return Sorted(order // k, weights.flatten()[order], counts, torch.cumsum(counts, 0, dtype=torch.int32))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``_grouped_mm``'s CPU
    backward rejects zero-stride gradients such as the expanded one of ``.sum()``."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x (S, in)`` rows grouped by expert times ``weight (E, out, in)`` transposed -> ``(S, out)``."""
    return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets))


class Experts(nn.Module):
    """``n_experts`` SwiGLU experts ``d_model -> d_hidden -> d_model`` stored as packed tensors.

    ``forward(x (N, d), sorted) -> (N, d)`` float32: ``sum_k weight_k * expert_k(x)`` over each token's
    routed experts (zero for a token routed nowhere, e.g. dropped by capacity).
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, init_std: float, out_std: float,
                 dispatch: Dispatch = "auto"):
        super().__init__()
        self.n_experts, self.d_hidden, self.dispatch = n_experts, d_hidden, dispatch
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        nn.init.normal_(self.gate_up_proj, std=init_std)
        nn.init.normal_(self.down_proj, std=out_std)

    def params_per_expert(self) -> int:
        return (self.gate_up_proj.numel() + self.down_proj.numel()) // self.n_experts

    def forward(self, x: torch.Tensor, sorted: Sorted) -> torch.Tensor:
        gate_up, down = self.gate_up_proj, self.down_proj
        rows = x[sorted.token]  # (S, d)
        if torch.is_autocast_enabled(x.device.type):
            # _grouped_mm is not on autocast's list: cast as autocast would for a linear layer.
            dtype = torch.get_autocast_dtype(x.device.type)
            rows, gate_up, down = rows.to(dtype), gate_up.to(dtype), down.to(dtype)
        if self._use_grouped_mm(rows.dtype):
            h = grouped_linear(rows, gate_up, sorted.offsets)  # (S, 2 I)
            gate, up = h.chunk(2, dim=-1)
            y = grouped_linear(F.silu(gate) * up, down, sorted.offsets)  # (S, d)
        else:
            y = _loop_experts(rows, gate_up, down, sorted.counts)
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        return out.index_add_(0, sorted.token, y.to(out.dtype) * sorted.weight[:, None].to(out.dtype))

    def _use_grouped_mm(self, dtype: torch.dtype) -> bool:
        available = hasattr(torch, "_grouped_mm") and dtype in GROUPED_MM_DTYPES
        if self.dispatch == "grouped_mm" and not available:
            raise RuntimeError(f"dispatch='grouped_mm' needs torch._grouped_mm with a dtype in "
                               f"{GROUPED_MM_DTYPES}, got {dtype}; use dispatch='auto' or 'loop'")
        return available and self.dispatch != "loop"


def _loop_experts(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  counts: torch.Tensor) -> torch.Tensor:
    """The per-expert fallback of the grouped GEMM: one SwiGLU per expert on its contiguous rows."""
    outputs = []
    for e, chunk in enumerate(rows.split(counts.tolist())):
        gate, up = F.linear(chunk, gate_up[e]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, down[e]))
    return torch.cat(outputs)


def naive_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                  gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Reference: for each expert, its tokens by mask, the SwiGLU, the weighted sum. ``(N, d)``."""
    out = torch.zeros_like(x)
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.nonzero(indices == e, as_tuple=True)
        gate, up = F.linear(x[token], gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e])
        out = out.index_put((token,), y * weights[token, slot, None], accumulate=True)
    return out
