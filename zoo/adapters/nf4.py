"""4-bit NormalFloat storage of frozen base linears for QLoRA (Dettmers et al. 2023, "QLoRA", §3: NF4 with
double quantisation), through torchao's ``NF4Tensor`` rather than a quantiser of our own.

torchao quantises blocks of ``NF4_BLOCK`` consecutive weights by their absmax to the nearest of the 16 NF4
code values, and double-quantises those absmax scales to int8 in blocks of up to 256 (QLoRA §3, "Double
Quantization"); ``F.linear`` on the result dequantises on the fly. torchao is imported only when a model is
quantised (it is an optional dependency, and noisy at import).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

NF4_BLOCK = 64  # weights per absmax block (QLoRA §3)
SCALER_BLOCK = 256  # absmax scales per double-quantisation block (QLoRA §3)
_TORCHAO_NF4 = "torchao.quantization"


def _nf4_module():
    try:
        import torchao.quantization as nf4
    except ImportError as err:
        raise ImportError("model.adapter.base_quant: nf4 needs torchao: pip install 'zoo[peft]' or "
                          "pip install torchao") from err
    return nf4


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a torchao ``NF4Tensor`` (never true before torchao was imported)."""
    module = sys.modules.get(_TORCHAO_NF4)
    return module is not None and isinstance(tensor, module.NF4Tensor)


def to_nf4(weight: torch.Tensor):
    """``weight`` as a torchao ``NF4Tensor`` (blocks of :data:`NF4_BLOCK`, scales double-quantised in blocks of
    the largest divisor of the block count up to :data:`SCALER_BLOCK`)."""
    if weight.numel() % NF4_BLOCK:
        raise ValueError(f"NF4 quantises blocks of {NF4_BLOCK} weights; a weight of shape {tuple(weight.shape)} "
                         f"has {weight.numel()} elements")
    n_blocks = weight.numel() // NF4_BLOCK
    scaler_block = max(d for d in range(1, min(SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)
    return _nf4_module().to_nf4(weight.detach().contiguous(), NF4_BLOCK, scaler_block)


def dense_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight`` dequantised when it is NF4, else itself (cast to ``dtype`` when given)."""
    if is_nf4(weight):
        weight = weight.get_original_weight()
    return weight if dtype is None else weight.to(dtype)


def quantize_linear(linear: nn.Linear) -> nn.Linear:
    """``linear`` with its frozen weight stored in NF4 (in place; returned). A weight whose element count is no
    multiple of :data:`NF4_BLOCK` stays in high precision, as FP8 skips layers that do not fit its tiles."""
    if linear.weight.numel() % NF4_BLOCK == 0 and not is_nf4(linear.weight):
        linear.weight = nn.Parameter(to_nf4(linear.weight), requires_grad=False)
    return linear
