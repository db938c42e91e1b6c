"""FP8 checkpoints in the DeepSeek-V3 layout: e4m3 ``weight`` + float32 ``weight_scale_inv``.

Each quantised linear stores ``<name>.weight`` as ``float8_e4m3fn (N, K)`` and
``<name>.weight_scale_inv`` as ``float32 (ceil(N/128), ceil(K/128))``, one inverse scale per 128x128
block (edge blocks zero-padded when computing their amax), so ``W ≈ weight * scale_inv`` blockwise;
``config.json`` carries :data:`QUANTIZATION_CONFIG` (the keys DeepSeek-V3's release uses). The
linears quantised are those the FP8 conversion would consider (:data:`zoo.fp8.convert.DEFAULT_SKIP`
plus ``model.fp8.skip`` excluded), at any dims; packed expert tensors ``(E, N, K)`` get one block grid
per expert, ``weight_scale_inv``-style as ``<name>_scale_inv (E, ceil(N/128), ceil(K/128))``;
everything else stays in its own dtype.
"""

from __future__ import annotations


import torch
from torch import nn

from zoo.blocks.experts import Experts
from zoo.fp8.convert import DEFAULT_SKIP, skip_patterns_filter
from zoo.fp8.quant import BLOCK, E4M3, dequantize, quantize

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": list(BLOCK)}
SCALE_SUFFIX = "_scale_inv"


def quantized_weight_names(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """State-dict names of the weights an fp8 checkpoint of ``model`` stores in e4m3: linear weights
    and packed expert tensors (``gate_up_proj``, ``down_proj``; one block grid per expert), those whose
    names match ``DEFAULT_SKIP`` or ``skip`` (``model.fp8.skip``) excepted."""
    accept = skip_patterns_filter((*DEFAULT_SKIP, *skip))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and accept(name, module):
            names.append(f"{name}.weight")
        elif isinstance(module, Experts) and accept(name, module):
            names += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    return names


def quantize_state_dict(state_dict: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each of ``names`` as an e4m3 weight plus its 128x128-block ``weight_scale_inv``."""
    out = dict(state_dict)
    for name in names:
        if name in out:
            quantized = [quantize(w, E4M3, BLOCK, amax_floor=1e-4) for w in _matrices(out[name].detach())]
            out[name], out[name + SCALE_SUFFIX] = (torch.stack(t).view(*out[name].shape[:-2], *t[0].shape[-2:])
                                                   for t in zip(*quantized))
    return out


def _matrices(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The trailing 2-D matrices of ``tensor`` (itself for a linear weight, one per expert when packed)."""
    return list(tensor.reshape(-1, *tensor.shape[-2:]).unbind(0))


def dequantize_state_dict(state_dict: dict[str, torch.Tensor], quantization_config: dict) -> dict[str, torch.Tensor]:
    """The float32 weights of an fp8 state dict (each ``weight * weight_scale_inv`` per block)."""
    _check_quantization_config(quantization_config)
    block = tuple(quantization_config["weight_block_size"])
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state_dict.get(name + SCALE_SUFFIX)
        if scale is None:
            out[name] = tensor
        else:
            matrices = [dequantize(q, s, block) for q, s in zip(_matrices(tensor), _matrices(scale))]
            out[name] = torch.stack(matrices).view(tensor.shape)
    return out


def _check_quantization_config(config: dict) -> None:
    expected = {"quant_method": "fp8", "fmt": "e4m3"}
    for key, value in expected.items():
        if config.get(key) != value:
            raise ValueError(f"quantization_config.{key}={config.get(key)!r} is not supported; zoo reads "
                             f"{QUANTIZATION_CONFIG}")
    block = config.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
