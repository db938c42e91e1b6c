"""Packed SwiGLU experts run as grouped GEMMs over tokens sorted by expert.

The routed ``(token, expert)`` pairs are sorted by expert (stable, so ties keep token order); each
expert's rows are then contiguous and both projections of every expert run as one grouped GEMM
(``torch._grouped_mm``, which has CPU and Hopper kernels) with ``offs`` the cumulative
row counts. The expert outputs are weighted and summed back per token in float32 with ``index_add_``
over the sorted token ids (deterministic: a serial scatter on CPU). Forward and backward are one
hand-written autograd node (:class:`_GroupedSwiGLU`, four grouped GEMMs in the backward), which also
keeps ``_grouped_mm``'s CPU backward away from zero-stride gradients it rejects. No Python loop over
tokens; a per-expert loop is the fallback where ``_grouped_mm`` is missing or lacks the dtype (it
takes float32, bfloat16 and float16 only), and :func:`naive_experts` (per-expert masks) is the
reference the tests hold both to.

Weights use transformers' packed layout: ``gate_up_proj (E, 2 I, d)`` with the gate rows first and
``down_proj (E, d, I)``, so ``y = down_proj[e] @ (silu(gate) * up)`` (SwiGLU, Shazeer 2020, Eq. 6).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Dispatch = Literal["auto", "grouped_mm", "loop"]
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_ROW_ALIGN = 64  # rows per expert padded to a multiple of this on CPU (see pad_groups)


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


def pad_groups(pairs: Sorted, n_tokens: int, align: int) -> Sorted:
    """``pairs`` with each expert's rows padded to a multiple of ``align``: padding rows read token
    ``n_tokens`` (a zero row the grouped GEMM appends) with gate weight 0, so they add nothing.

    On CPU each expert's GEMM is a oneDNN matmul compiled for its exact row count, and routing changes the
    counts every step: unpadded, every step compiles new kernels. Padded, the counts come from a small set
    that oneDNN's primitive cache keeps."""
    padded_counts = (pairs.counts + align - 1) // align * align
    padded_starts = torch.cumsum(padded_counts, 0) - padded_counts
    starts = torch.cumsum(pairs.counts, 0) - pairs.counts
    expert = torch.repeat_interleave(torch.arange(len(pairs.counts), device=pairs.counts.device), pairs.counts)
    position = padded_starts[expert] + torch.arange(pairs.token.numel(), device=expert.device) - starts[expert]
    rows = int(padded_counts.sum())
    token = pairs.token.new_full((rows,), n_tokens).index_copy_(0, position, pairs.token)
    weight = pairs.weight.new_zeros(rows).index_put((position,), pairs.weight)
    return Sorted(token, weight, padded_counts, torch.cumsum(padded_counts, 0, dtype=torch.int32))


class _GroupedSwiGLU(torch.autograd.Function):
    """Gather, both grouped GEMMs, SwiGLU and the weighted float32 scatter-add as one autograd node.

    Forward ``(x (N, d), token (S,), weight (S,), offsets, gate_up (E, 2I, d), down (E, d, I), dtype)
    -> (N, d)`` float32, GEMMs in ``dtype``; ``token == N`` reads a zero row (padding, see
    :func:`pad_groups`). The backward writes the gate and up gradients into one ``(S, 2I)`` buffer and
    scatters the input gradient with ``index_add_``, which autograd's generic chunk/cat/index_put formulas
    would each spend a full pass of memory on.
    """

    @staticmethod
    def forward(ctx, x, token, weight, offsets, gate_up, down, dtype):
        gate_up_c, down_c = gate_up.to(dtype), down.to(dtype)
        rows = F.pad(x.to(dtype), (0, 0, 0, 1))[token]  # (S, d); row N is zero
        h = torch._grouped_mm(rows, gate_up_c.transpose(1, 2), offs=offsets)  # (S, 2I)
        gate, up = h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        act = silu_gate * up  # (S, I)
        y = torch._grouped_mm(act, down_c.transpose(1, 2), offs=offsets)  # (S, d)
        out = torch.zeros((x.shape[0] + 1, x.shape[1]), dtype=torch.float32, device=x.device)
        out.index_add_(0, token, torch.mul(y, weight[:, None]))
        ctx.save_for_backward(token, weight, offsets, gate_up_c, down_c, rows, h, silu_gate, act, y)
        ctx.x_dtype, ctx.param_dtype = x.dtype, gate_up.dtype
        return out[:-1]

    @staticmethod
    def backward(ctx, grad_out):
        token, weight, offsets, gate_up_c, down_c, rows, h, silu_gate, act, y = ctx.saved_tensors
        grad_rows_out = F.pad(grad_out, (0, 0, 0, 1))[token]  # (S, d) float32
        grad_weight = torch.linalg.vecdot(grad_rows_out, y.float())
        grad_y = torch.mul(grad_rows_out, weight[:, None]).to(y.dtype)
        grad_down = torch._grouped_mm(grad_y.t(), act, offs=offsets)  # (E, d, I)
        grad_act = torch._grouped_mm(grad_y, down_c, offs=offsets)  # (S, I)
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)  # (S, 2I): gate gradient in the first half, up in the second
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=grad_gate)
        torch.mul(grad_act, silu_gate, out=grad_up)
        grad_gate_up = torch._grouped_mm(grad_h.t(), rows, offs=offsets)  # (E, 2I, d)
        grad_rows = torch._grouped_mm(grad_h, gate_up_c, offs=offsets)  # (S, d)
        grad_x = torch.zeros((grad_out.shape[0] + 1, grad_out.shape[1]), dtype=torch.float32,
                             device=grad_out.device)
        grad_x.index_add_(0, token, grad_rows.float())
        return (grad_x[:-1].to(ctx.x_dtype), None, grad_weight, None, grad_gate_up.to(ctx.param_dtype),
                grad_down.to(ctx.param_dtype), None)


class Experts(nn.Module):
    """``n_experts`` SwiGLU experts ``d_model -> d_hidden -> d_model`` stored as packed tensors.

    ``forward(x (N, d), pairs) -> (N, d)`` float32: ``sum_k weight_k * expert_k(x)`` over each token's
    routed experts (zero for a token routed nowhere, e.g. dropped by capacity). A dispatcher that moves
    the rows itself (:mod:`zoo.blocks.dispatch`) passes them already sorted with identity ``pairs.token``
    and unit ``pairs.weight``, and gets each row's expert output back. Under expert parallelism the packed
    weights are DTensors sharded on dim 0 and ``pairs`` count this rank's experts only.
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, init_std: float, out_std: float,
                 dispatch: Dispatch = "auto"):
        super().__init__()
        self.n_experts, self.d_hidden, self.dispatch = n_experts, d_hidden, dispatch
        self.init_std, self.out_std = init_std, out_std
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))

    def init_own_weights(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.out_std)

    def params_per_expert(self) -> int:
        return (self.gate_up_proj.numel() + self.down_proj.numel()) // self.n_experts

    def forward(self, x: torch.Tensor, pairs: Sorted) -> torch.Tensor:
        gate_up_proj, down_proj = _local(self.gate_up_proj), _local(self.down_proj)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            # _grouped_mm is not on autocast's list: cast as autocast would for a linear layer.
            dtype = torch.get_autocast_dtype(x.device.type)
        if self._use_grouped_mm(dtype):
            if x.device.type == "cpu":
                pairs = pad_groups(pairs, x.shape[0], CPU_ROW_ALIGN)
            grouped = _GroupedSwiGLU.apply
            if dtype != torch.bfloat16 and torch.compiler.is_compiling():  # Dynamo's fake _grouped_mm takes bf16
                grouped = torch.compiler.disable(grouped)  # only: run it outside the graph (made here, not at import:
                # disable() imports Dynamo, which `import zoo` must not pay for)
            return grouped(x, pairs.token, pairs.weight, pairs.offsets, gate_up_proj, down_proj, dtype)
        rows = x[pairs.token].to(dtype)  # (S, d)
        y = _loop_experts(rows, gate_up_proj.to(dtype), down_proj.to(dtype), pairs.counts)
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        return out.index_add_(0, pairs.token, y.to(out.dtype) * pairs.weight[:, None].to(out.dtype))

    def _use_grouped_mm(self, dtype: torch.dtype) -> bool:
        available = hasattr(torch, "_grouped_mm") and dtype in GROUPED_MM_DTYPES
        if self.dispatch == "grouped_mm" and not available:
            raise RuntimeError(f"dispatch='grouped_mm' needs torch._grouped_mm with a dtype in "
                               f"{GROUPED_MM_DTYPES}, got {dtype}; use dispatch='auto' or 'loop'")
        return available and self.dispatch != "loop"


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an expert-parallel (DTensor) weight; a plain weight as it is. (No DTensor exists
    before ``torch.distributed.tensor`` is imported, which ``import zoo`` leaves to the parallelize step.)"""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return weight.to_local() if dtensor is not None and isinstance(weight, dtensor.DTensor) else weight


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
