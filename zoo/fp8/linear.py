"""The FP8 linear layer: all three GEMMs of ``y = x W^T + b`` on float8 operands.

Recipes (how each GEMM's two operands are scaled; ``a @ b^T`` with both quantised along the
reduction dim):

=============  ======================  =========================  ==========================
recipe         forward  x · W          grad_input  dy · W          grad_weight  dy^T · x
=============  ======================  =========================  ==========================
tensorwise     e4m3 / e4m3, per tensor  e5m2 / e4m3, per tensor     e5m2 / e4m3, per tensor
rowwise        e4m3, per row, 2^n       e4m3, per row, 2^n          e4m3, per row, 2^n
blockwise      e4m3 1x128 / 128x128     e4m3 1x128 / 128x128        e4m3 1x128 / 1x128
=============  ======================  =========================  ==========================

``tensorwise`` is torchao's default (Transformer Engine's "hybrid" format: E4M3 forward, E5M2
gradients) with current (just-in-time) scaling; ``rowwise`` is torchao's rowwise recipe with
power-of-2 scales; ``blockwise`` is DeepSeek-V3 §3.3 (Fig. 7a): 1x128 tiles for activations and
gradients, 128x128 blocks for weights, E4M3 everywhere, scale ``max(amax, 1e-4) / 448``.
``weight_grad_high_precision`` keeps the weight-gradient GEMM in float32 (torchao's
``rowwise_with_gw_hp``). Master weights, their gradients and optimizer states are untouched: the
layer's parameters are those of the ``nn.Linear`` it replaces, in their own dtype.

Backends: ``torch._scaled_mm`` (float8 tensor cores, fp32 accumulation) for tensorwise and rowwise
scales on CUDA devices of compute capability >= 8.9 when the GEMM's dims are multiples of 16 (``auto``;
``scaled_mm`` forces it, on CPU too, whose kernel takes the same scales); otherwise emulation: quantise ->
dequantise to float32 -> float32 matmul, the same function up to accumulation order. Blockwise GEMMs are
emulated on every device. Every ``_scaled_mm`` call meets CUDA's contract (see :func:`fp8_matmul`),
checked on CPU by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from zoo.fp8.quant import BLOCK, E4M3, E5M2, ROWWISE, TENSORWISE, TILE, dequantize, quantize

Backend = Literal["auto", "emulate", "scaled_mm"]


@dataclass(frozen=True)
class Operand:
    """How one GEMM operand ``(rows, K)`` is quantised: ``q = round(x / s)`` per block with the inverse
    scale ``s = max(amax, amax_floor) / fmax`` from the current amax (DeepSeek-V3 §3.3.2, "online
    quantization"; the floor keeps an all-zero block finite).

    ``dtype``: ``E4M3`` (max 448) or ``E5M2`` (max 57344, Transformer Engine's gradient format);
    ``block``: the scaling granularity, ``TENSORWISE``, ``ROWWISE``, ``TILE (1, 128)`` or ``BLOCK (128, 128)``
    (DeepSeek-V3 Fig. 7a) of :mod:`zoo.fp8.quant`; ``power_of_2``: ``s`` rounded up to a power of 2 (torchao's
    rowwise recipe), so scaling is exact.
    """

    dtype: torch.dtype
    block: tuple[int, int]
    amax_floor: float = 1e-12
    power_of_2: bool = False


@dataclass(frozen=True)
class Recipe:
    """The operand scalings of the three GEMMs of a linear ``y = x W^T``, each as ``a @ b^T`` quantised
    along its reduction dim: ``forward`` ``(x, W)``, ``grad_input`` ``(dy, W^T)`` for ``dx = dy W``,
    ``grad_weight`` ``(dy^T, x^T)`` for ``dW = dy^T x`` (DeepSeek-V3 §3.3.1, Fig. 6: Fprop, Dgrad, Wgrad).
    The three recipes are tabled in :mod:`zoo.fp8.linear`: torchao's tensorwise and rowwise, DeepSeek-V3's
    blockwise, whose gradients use 1x128 tiles only (App. B.2: 128x128 blocks on activation gradients made
    a 16B model diverge). ``granularity``: the multiple a layer's dims need (16; 128 for blockwise);
    ``weight_grad_high_precision`` keeps Wgrad in float32 (torchao's ``rowwise_with_gw_hp``).
    """

    name: str
    forward: tuple[Operand, Operand]  # (x, W)
    grad_input: tuple[Operand, Operand]  # (dy, W^T)
    grad_weight: tuple[Operand, Operand]  # (dy^T, x^T)
    granularity: int
    weight_grad_high_precision: bool = False


def _tensorwise() -> Recipe:
    fwd, grad = Operand(E4M3, TENSORWISE), Operand(E5M2, TENSORWISE)
    return Recipe("tensorwise", (fwd, fwd), (grad, fwd), (grad, fwd), granularity=16)


def _rowwise() -> Recipe:
    row = Operand(E4M3, ROWWISE, power_of_2=True)
    return Recipe("rowwise", (row, row), (row, row), (row, row), granularity=16)


def _blockwise() -> Recipe:
    # DeepSeek-V3's floor of 1e-4 on amax applies to activations and weights; gradients scale with
    # 1 / tokens and would be flushed towards zero by it, so they keep the tiny floor.
    tile, block = Operand(E4M3, TILE, amax_floor=1e-4), Operand(E4M3, BLOCK, amax_floor=1e-4)
    grad = Operand(E4M3, TILE)
    return Recipe("blockwise", (tile, block), (grad, block), (grad, tile), granularity=128)


RECIPES = {"tensorwise": _tensorwise, "rowwise": _rowwise, "blockwise": _blockwise}


def make_recipe(name: str, weight_grad_high_precision: bool = False) -> Recipe:
    """The recipe called ``name`` (``tensorwise``, ``rowwise`` or ``blockwise``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown fp8 recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]()
    return Recipe(recipe.name, recipe.forward, recipe.grad_input, recipe.grad_weight, recipe.granularity,
                  weight_grad_high_precision)


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, spec: tuple[Operand, Operand], out_dtype: torch.dtype,
               backend: Backend = "auto") -> torch.Tensor:
    """``a (M, K) @ b (N, K)^T -> (M, N)`` in ``out_dtype``, both operands quantised along the reduction
    dim ``K`` per ``spec``: ``C ≈ (Q_a ⊙ S_a)(Q_b ⊙ S_b)^T`` with float32 accumulation (DeepSeek-V3
    §3.3.2: fine-grained scales, float32 accumulation; the ``torch._scaled_mm`` GEMM torchao calls).

    ``a`` and ``b`` may have any strides (the backward passes ``weight.t()``, ``grad_out.t()``, ``x.t()``):
    :func:`quantize` returns row-major operands, so ``torch._scaled_mm`` gets what CUDA requires, ``mat1 =
    Q_a`` row-major and ``mat2 = Q_b^T`` column-major, with float32 scales ``(1, 1)`` per tensor or ``(M, 1)``
    and ``(1, N)`` per row. Rowwise GEMMs write bfloat16, the output CUDA's rowwise kernels take on every
    GPU (float32 only on sm90 with cuBLAS >= 12.9), and do so on every backend, emulation included, so that
    all backends compute one function.
    """
    spec_a, spec_b = spec
    qa, sa = quantize(a, spec_a.dtype, spec_a.block, spec_a.amax_floor, spec_a.power_of_2)  # (M, K), row-major
    qb, sb = quantize(b, spec_b.dtype, spec_b.block, spec_b.amax_floor, spec_b.power_of_2)  # (N, K), row-major
    gemm_dtype = torch.bfloat16 if spec_a.block == spec_b.block == ROWWISE else out_dtype
    if _use_scaled_mm(a, b, spec, backend):
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=gemm_dtype).to(out_dtype)
    product = dequantize(qa, sa, spec_a.block) @ dequantize(qb, sb, spec_b.block).t()
    return product.to(gemm_dtype).to(out_dtype)


def _use_scaled_mm(a: torch.Tensor, b: torch.Tensor, spec: tuple[Operand, Operand], backend: Backend) -> bool:
    if backend == "emulate":
        return False
    if any(op.block not in (TENSORWISE, ROWWISE) for op in spec):
        return False
    if E5M2 == spec[0].dtype == spec[1].dtype or any(d % 16 for d in (*a.shape, b.shape[0])):
        return False
    if backend == "scaled_mm":
        return True
    return a.is_cuda and torch.cuda.get_device_capability(a.device) >= (8, 9)


class _Float8LinearFn(torch.autograd.Function):
    """``x2d (M, K), weight (N, K) -> (M, N)``: the three GEMMs on float8 per ``recipe``."""

    @staticmethod
    def forward(ctx, x2d, weight, recipe: Recipe, backend: Backend, out_dtype: torch.dtype):
        ctx.save_for_backward(x2d, weight)
        ctx.recipe, ctx.backend = recipe, backend
        return fp8_matmul(x2d, weight, recipe.forward, out_dtype, backend)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight = ctx.saved_tensors
        recipe, backend = ctx.recipe, ctx.backend
        grad_out = grad_out.contiguous()
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = fp8_matmul(grad_out, weight.t(), recipe.grad_input, x2d.dtype, backend)
        if ctx.needs_input_grad[1]:
            if recipe.weight_grad_high_precision:
                grad_weight = (grad_out.t().float() @ x2d.float()).to(weight.dtype)
            else:
                grad_weight = fp8_matmul(grad_out.t(), x2d.t(), recipe.grad_weight, weight.dtype, backend)
        return grad_input, grad_weight, None, None, None


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose forward, input-gradient and weight-gradient GEMMs run on float8.

    ``y = x W^T + b`` with ``x W^T ≈ (Q_x ⊙ S_x)(Q_W ⊙ S_W)^T``, and likewise ``dx = dy W`` and
    ``dW = dy^T x``, each GEMM quantised per its :class:`Recipe` (DeepSeek-V3 §3.3 and Fig. 6; torchao
    ``Float8Linear``; Transformer Engine's E4M3/E5M2 "hybrid" format for tensorwise). Parameters are those
    of ``nn.Linear`` (same names, shapes and dtype: checkpoints of a model with and without FP8 are
    interchangeable; the master weights and their gradients stay in high precision). ``x (...,
    in_features) -> (..., out_features)`` in the autocast dtype when autocast is on, else in ``x``'s dtype;
    the bias is added after the GEMM in that dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Recipe | None = None,
                 backend: Backend = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.recipe = recipe or make_recipe("tensorwise")
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, backend: Backend = "auto") -> "Float8Linear":
        """A Float8Linear holding ``linear``'s own parameter objects (tied weights stay tied)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe, backend)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            y = _Float8LinearFn.apply(x.reshape(-1, self.in_features), self.weight, self.recipe, self.backend,
                                      out_dtype)
            if self.bias is not None:
                y = y + self.bias.to(out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        hp = ", weight_grad_high_precision" if self.recipe.weight_grad_high_precision else ""
        return f"{super().extra_repr()}, recipe={self.recipe.name}{hp}, backend={self.backend}"
