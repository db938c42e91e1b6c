"""FP8 packed experts: the MoE grouped GEMMs on float8 operands, emulated.

DeepSeek-V3 §3.3 runs the expert GEMMs in FP8 like any linear: tokens quantised per 1x128 tile,
each expert's weight per 128x128 block. :class:`Float8Experts` keeps the packed parameters of
:class:`zoo.blocks.experts.Experts` (``gate_up_proj (E, 2I, d)``, ``down_proj (E, d, I)``) and runs
both grouped GEMMs through :class:`_Float8GroupedMM`, whose three GEMMs are quantised per the recipe
as in :mod:`zoo.fp8.linear`: operand ``a`` over the routed rows, operand ``b`` per expert (a tensorwise
weight scale is one scale per expert). The quantised operands are dequantised to float32 and
multiplied with ``torch._grouped_mm``; the weight gradient is quantised per expert's rows along the
token dim.

Emulated on every device. torch's float8 grouped GEMM, ``torch._scaled_grouped_mm``, has no CPU
kernel (only CUDA and meta), and on CUDA it takes E4M3 operands with float32 rowwise scales only (one per
row of ``a``, one per output column of each expert's ``b``) and writes bfloat16: tensorwise (E5M2
gradients) and blockwise (1x128 / 128x128 scales) do not fit it, and a rowwise-only GPU path is left
out because nothing here could test it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.blocks.experts import Experts, Sorted
from zoo.fp8.linear import Operand, Recipe
from zoo.fp8.quant import dequantize, quantize


def _fake_quant(x: torch.Tensor, op: Operand) -> torch.Tensor:
    """``x (M, K)`` quantised per ``op`` and dequantised to float32."""
    return dequantize(*quantize(x, op.dtype, op.block, op.amax_floor, op.power_of_2), op.block)


def _per_expert(w: torch.Tensor, op: Operand) -> torch.Tensor:
    """``w (E, N, K)`` fake-quantised expert by expert (the experts' scales never mix)."""
    return torch.stack([_fake_quant(w_e, op) for w_e in w.unbind(0)])


class _Float8GroupedMM(torch.autograd.Function):
    """``rows (S, K)`` sorted by expert, ``weight (E, N, K)`` -> ``(S, N)`` float32, rows of expert e
    times ``weight[e]^T``; ``counts (E,)`` rows per expert, ``offsets`` their int32 cumulative sums."""

    @staticmethod
    def forward(ctx, rows, weight, counts, offsets, recipe: Recipe):
        ctx.save_for_backward(rows, weight, counts, offsets)
        ctx.recipe = recipe
        a_op, b_op = recipe.forward
        return torch._grouped_mm(_fake_quant(rows, a_op), _per_expert(weight, b_op).transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, counts, offsets = ctx.saved_tensors
        recipe = ctx.recipe
        grad_out = grad_out.float().contiguous()
        dy_op, wt_op = recipe.grad_input
        weight_t = _per_expert(weight.transpose(1, 2), wt_op)  # (E, K, N): W_e^T quantised along N
        grad_rows = torch._grouped_mm(_fake_quant(grad_out, dy_op), weight_t.transpose(1, 2), offs=offsets)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        dyt_op, xt_op = recipe.grad_weight
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count:
                dy_e, x_e = grad_out[start:start + count], rows[start:start + count].float()
                if recipe.weight_grad_high_precision:
                    grad_weight[e] = dy_e.t() @ x_e
                else:
                    grad_weight[e] = _fake_quant(dy_e.t(), dyt_op) @ _fake_quant(x_e.t(), xt_op).t()
            start += count
        return grad_rows.to(rows.dtype), grad_weight.to(weight.dtype), None, None, None


class Float8Experts(Experts):
    """:class:`Experts` whose two grouped GEMMs (and their gradients) run on emulated float8.

    Expert ``e``'s SwiGLU ``down_e(silu(gate_e x) ⊙ up_e x)`` (Shazeer 2020, Eq. 6) with both projections
    and their input- and weight-gradient GEMMs quantised per the :class:`Recipe`, as DeepSeek-V3 §3.3
    (Fig. 6) runs every expert GEMM in FP8: blockwise puts the routed rows on 1x128 tiles and each expert's
    weight on 128x128 blocks. ``forward(x (N, d), sorted) -> (N, d)`` float32 like the parent; GEMM outputs
    are rounded to the autocast dtype (as a float8 kernel writes them), SwiGLU and the weighted combine
    follow the parent. Emulated on every device (see :mod:`zoo.fp8.experts` for why).
    """

    recipe: Recipe

    @classmethod
    def from_experts(cls, experts: Experts, recipe: Recipe) -> "Float8Experts":
        """A Float8Experts holding ``experts``' own packed parameters."""
        n_experts, two_hidden, d_model = experts.gate_up_proj.shape
        with torch.device("meta"):
            new = cls(n_experts, d_model, two_hidden // 2, experts.init_std, experts.out_std, experts.dispatch)
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.recipe = recipe
        return new

    def forward(self, x: torch.Tensor, sorted: Sorted) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            rows = x[sorted.token]  # (S, d)
            h = _Float8GroupedMM.apply(rows, self.gate_up_proj, sorted.counts, sorted.offsets, self.recipe)
            gate, up = h.to(dtype).chunk(2, dim=-1)  # (S, I) each
            act = F.silu(gate) * up
            y = _Float8GroupedMM.apply(act, self.down_proj, sorted.counts, sorted.offsets, self.recipe).to(dtype)
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            return out.index_add(0, sorted.token, y.float() * sorted.weight[:, None])

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name}"
