"""fp8 transformers checkpoints: DeepSeek-V3's released format, dequantised on load.

``quantization_config = {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128,
128]}`` (DeepSeek-V3, arXiv 2412.19437, §3.3 and the release): each quantised weight ``W (N, K)`` (or a packed
expert tensor ``(E, N, K)``) is stored as ``float8_e4m3fn`` beside a float32 ``<name>_scale_inv`` of one inverse
scale per 128x128 block (edge blocks partial), ``W = q * scale_inv`` blockwise. The importer multiplies them
out into the dtype of the checkpoint's high-precision tensors (its embedding's), so the family converters see a
plain checkpoint. To run the imported linears on fp8 again, load with ``model.fp8: {recipe: blockwise}``: its
128x128 weight blocks re-quantise each dequantised weight to the checkpoint's own e4m3 values.
"""

from __future__ import annotations

import torch

from zoo.errors import CheckpointError
from zoo.fp8.quant import E4M3, dequantize, scale_shape

SCALE_SUFFIX = "_scale_inv"
SUPPORTED = {"quant_method": ("fp8",), "fmt": ("e4m3", None), "activation_scheme": ("dynamic", None)}


def dequantize_fp8(hf_config: dict, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with every e4m3 tensor that has a ``<name>_scale_inv`` beside it dequantised (and the
    scales dropped); unchanged without a ``quantization_config``. Unsupported settings raise
    :class:`CheckpointError` naming the key and the supported values."""
    config = hf_config.get("quantization_config")
    if not config:
        return state_dict
    for key, supported in SUPPORTED.items():
        if config.get(key) not in supported:
            raise CheckpointError(f"{source}: quantization_config.{key}={config.get(key)!r} is not supported by the "
                                  f"zoo import; supported: {', '.join(repr(v) for v in supported if v)}")
    block = config.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{source}: quantization_config.weight_block_size={block!r} is not supported by the "
                              f"zoo import; supported: two positive integers, e.g. [128, 128]")
    embedding = state_dict.get("model.embed_tokens.weight")
    dtype = embedding.dtype if embedding is not None and embedding.is_floating_point() else torch.float32
    out = dict(state_dict)
    for name in [n for n in state_dict if n.endswith(SCALE_SUFFIX)]:
        weight_name = name[:-len(SCALE_SUFFIX)]
        if weight_name not in state_dict:
            continue  # left in place: reported by name as a tensor no converter maps
        out[weight_name] = _dequantized(state_dict[weight_name], out.pop(name), tuple(block), dtype,
                                        f"{source}: {weight_name}")
    return out


def _dequantized(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype,
                 where: str) -> torch.Tensor:
    if q.dtype != E4M3:
        raise CheckpointError(f"{where} has dtype {q.dtype} beside a weight_scale_inv; expected {E4M3}")
    grid = tuple(q.shape[:-2]) + scale_shape(tuple(q.shape[-2:]), block) if q.dim() >= 2 else None
    if grid is None or tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"{where}: weight_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(q.shape)} "
                              f"weight in {list(block)} blocks needs {grid}")
    matrices = [dequantize(m, s.float(), block) for m, s in zip(q.reshape(-1, *q.shape[-2:]),
                                                               scale_inv.reshape(-1, *grid[-2:]))]
    return torch.stack(matrices).view(q.shape).to(dtype)
