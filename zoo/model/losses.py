"""Cross-entropy against tokens ahead, computed in float32 a block of positions at a time.

Language-model losses are scored in at least float32 even when the logits are bf16. Upcasting the whole
``(positions, vocabulary)`` logits at once makes a float32 copy as large as the logits themselves
(2048 positions x 32k vocabulary: 262 MB), and on CPU the log-softmax over such a tensor runs several
times slower than over cache-sized blocks. Both functions here split the positions into blocks of about
``BLOCK_ELEMENTS`` logits and average over all scored positions: the same value as one float32
cross-entropy, with the same gradients.

- :func:`shifted_cross_entropy` scores logits the caller already has (``ZooOutput.logits``).
- :func:`linear_cross_entropy` fuses the output projection into the loss (as Liger-Kernel's fused linear
  cross-entropy, Hsu et al. 2024, arXiv 2410.10989 §3.2, does on GPUs): each block's logits are computed,
  scored and turned into their gradient ``softmax - onehot`` at once, so neither the logits nor their
  gradient ever exist for the whole batch. The training step uses it: it needs the loss, not the logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 logits per block
WEIGHT_GRAD_ELEMENTS = 1 << 25  # 64 MB of bf16 logit gradients per weight-gradient GEMM
GPU_SCALE = 16  # on GPUs both are 16x larger: fewer, fuller kernels, memory still bounded


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Mean cross-entropy of ``logits (B, T, V)`` where position ``t`` is scored on ``labels[:, t + shift]``
    (``labels (B, T + shift - 1 or more)``; positions without a label and labels ``-100`` are ignored).

    Reduced in at least float32; NaN when no position is scored (as ``F.cross_entropy``)."""
    B, T, V = logits.shape
    targets = shifted_targets(labels, T, shift)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = max(1, BLOCK_ELEMENTS // V)
    total = sum(F.cross_entropy(block.to(dtype), target, ignore_index=-100, reduction="sum")
                for block, target in zip(logits.reshape(B * T, V).split(rows), targets.split(rows)))
    return total / (targets != -100).sum()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         shift: int = 1) -> torch.Tensor:
    """``shifted_cross_entropy(hidden @ weight.T, labels, shift)`` without materialising the logits.

    ``hidden (B, T, d)``, ``weight (V, d)`` (a bias-free output head). The matmuls run in the autocast
    dtype when autocast is on (as ``F.linear`` would), the softmax and the reduction in at least float32.
    The gradients for ``hidden`` and ``weight`` are computed during the forward pass, block by block, and
    only scaled by the incoming gradient in the backward; without grad mode only the loss is computed."""
    B, T, d = hidden.shape
    targets = shifted_targets(labels, T, shift)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    return _LinearCrossEntropy.apply(hidden.reshape(B * T, d), weight, targets, dtype)


def shifted_targets(labels: torch.Tensor, T: int, shift: int) -> torch.Tensor:
    """``(B * T,)``: the label of each of ``T`` positions ``shift`` ahead, ``-100`` where there is none."""
    targets = labels[:, shift:shift + T]
    return F.pad(targets, (0, T - targets.shape[1]), value=-100).flatten()


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch tensor kept between calls (per name, dtype and device; grown when too small).

    On CPU a fresh tensor of tens of MB is a fresh ``mmap``, and touching its pages costs more than the
    arithmetic done on them (a page fault per 4 KB page); CUDA's caching allocator gives that reuse for free,
    the CPU allocator does not."""
    numel = math.prod(shape)
    key = (name, dtype, device)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


_WORKSPACES: dict[tuple, torch.Tensor] = {}


class _LinearCrossEntropy(torch.autograd.Function):
    """Blockwise ``mean_i CE(h_i W^T, y_i)`` with its gradients ``dL/dz = (softmax(z) - onehot(y)) / n``
    pushed through the projection inside the forward: ``dL/dh = dz W`` per block of ``BLOCK_ELEMENTS``
    logits, and ``dL/dW = dz^T h`` per group of blocks whose ``dz`` fill ``WEIGHT_GRAD_ELEMENTS``."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype):
        h_c, w_t = h.to(dtype), weight.to(dtype).t()
        loss_dtype = torch.promote_types(dtype, torch.float32)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        N, V = h.shape[0], weight.shape[0]
        scale = 1 if h.device.type == "cpu" else GPU_SCALE
        rows = min(N, max(1, scale * BLOCK_ELEMENTS // V))
        group = min(N, rows * max(1, scale * WEIGHT_GRAD_ELEMENTS // (rows * V)))
        logits_buffer = _workspace("logits", (rows, V), dtype, h.device)
        log_p_buffer = _workspace("log_p", (rows, V), loss_dtype, h.device)
        dz_buffer = _workspace("dz", (group, V), dtype, h.device) if need_grad else None
        total = torch.zeros((), dtype=loss_dtype, device=h.device)
        grad_h = torch.empty(h.shape, dtype=loss_dtype, device=h.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=loss_dtype, device=h.device) if need_grad else None
        for group_start in range(0, N, group):
            group_end = min(N, group_start + group)
            for start in range(group_start, group_end, rows):
                end = min(group_end, start + rows)
                scored = targets[start:end] != -100
                index = targets[start:end].clamp(min=0)[:, None]
                logits = torch.mm(h_c[start:end], w_t, out=logits_buffer[:end - start])  # (R, V)
                log_p = torch.log_softmax(logits, dim=-1, dtype=loss_dtype, out=log_p_buffer[:end - start])
                total -= (log_p.gather(1, index)[:, 0] * scored).sum()
                if need_grad:
                    dz = log_p.exp_()  # softmax, in place
                    dz.scatter_add_(1, index, torch.full(index.shape, -1.0, dtype=dz.dtype, device=dz.device))
                    dz = torch.mul(dz, scored[:, None], out=dz_buffer[start - group_start:end - group_start])
                    grad_h[start:end] = dz @ w_t.t()
            if need_grad:
                grad_w += dz_buffer[:group_end - group_start].t() @ h_c[group_start:group_end]
        n = (targets != -100).sum()
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n
        return (grad_h * scale).to(ctx.h_dtype), (grad_w * scale).to(ctx.w_dtype), None, None
