"""Float8 quantisation with scales per tensor, per row, per 1x128 tile or per 128x128 block.

A 2-D tensor ``x (M, K)`` is cut into blocks of ``(block_rows, block_cols)`` elements (0 means the
whole dimension; edge blocks are zero-padded, which leaves their amax unchanged). Each block gets a
float32 *inverse* scale ``s = max(amax, amax_floor) / fmax`` and is stored as ``round(x / s)`` in a
float8 format, saturating at ``±fmax``; ``x ≈ q * s`` (the convention of ``torch._scaled_mm`` and of
DeepSeek-V3's ``weight_scale_inv``). Power-of-2 scales (torchao's rowwise recipe) round ``s`` up to a
power of 2, so the scaling itself is exact and the amax lands in ``(fmax / 2, fmax]``.

Granularities (DeepSeek-V3 §3.3.1, Fig. 7a): ``TENSORWISE (0, 0)``, ``ROWWISE (1, 0)``,
``TILE (1, 128)`` for activations and gradients, ``BLOCK (128, 128)`` for weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn  # 4 exponent bits, 3 mantissa bits, max 448: forward operands
E5M2 = torch.float8_e5m2  # 5 exponent bits, 2 mantissa bits, max 57344: gradients in the "hybrid" recipes

TENSORWISE = (0, 0)
ROWWISE = (1, 0)
TILE = (1, 128)
BLOCK = (128, 128)


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of a float8 format (448 for e4m3fn, 57344 for e5m2)."""
    return torch.finfo(dtype).max


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the inverse-scale grid of a ``(M, K)`` tensor cut into ``block`` (0: whole dim)."""
    (rows, cols), (block_rows, block_cols) = shape, _block(shape, block)
    return -(-rows // block_rows), -(-cols // block_cols)


def quantize(x: torch.Tensor, dtype: torch.dtype = E4M3, block: tuple[int, int] = TENSORWISE,
             amax_floor: float = 1e-12, power_of_2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K)`` as ``(q (M, K) in dtype, scale_inv (Mb, Kb) float32)`` with ``x ≈ q * scale_inv``
    blockwise; the amax of each block maps to the format's max (to within a factor 2 with
    ``power_of_2``); values beyond it (none, by construction) would saturate rather than overflow.

    ``q`` and ``scale_inv`` are row-major (contiguous) whatever ``x``'s strides: quantising ``w.t()``
    gives the compact ``(K, N)`` operand float8 GEMM kernels expect, not a transposed view."""
    rows, cols = x.shape
    block_rows, block_cols = _block(x.shape, block)
    blocks = _to_blocks(x.float(), block_rows, block_cols)  # (Mb, bm, Kb, bk)
    fmax = fp8_max(dtype)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=amax_floor) / fmax  # (Mb, Kb)
    if power_of_2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    # Contiguous 4-D blocks are the row-major (M, K) layout; the cast to float8 lays them out so.
    q = (blocks / scale[:, None, :, None]).clamp_(-fmax, fmax).to(dtype, memory_format=torch.contiguous_format)
    return _from_blocks(q, rows, cols), scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = TENSORWISE) -> torch.Tensor:
    """The float32 tensor ``q * scale_inv`` with each scale broadcast over its block."""
    rows, cols = q.shape
    block_rows, block_cols = _block(q.shape, block)
    blocks = _to_blocks(q.float(), block_rows, block_cols)
    return _from_blocks(blocks * scale_inv[:, None, :, None], rows, cols)


def _block(shape, block: tuple[int, int]) -> tuple[int, int]:
    return max(block[0] or shape[0], 1), max(block[1] or shape[1], 1)


def _to_blocks(x: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    rows, cols = x.shape
    n_rows, n_cols = -(-rows // block_rows), -(-cols // block_cols)
    if (n_rows * block_rows, n_cols * block_cols) != (rows, cols):
        x = F.pad(x, (0, n_cols * block_cols - cols, 0, n_rows * block_rows - rows))
    return x.reshape(n_rows, block_rows, n_cols, block_cols)


def _from_blocks(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    n_rows, block_rows, n_cols, block_cols = blocks.shape
    full = blocks.reshape(n_rows * block_rows, n_cols * block_cols)
    return full if full.shape == (rows, cols) else full[:rows, :cols].clone()  # own, compact storage
