"""Import Hugging Face transformers checkpoints as zoo models.

``convert_checkpoint(hf_config, state_dict, source)`` turns a transformers ``config.json`` and its tensors
into a zoo model config and a zoo state dict; :func:`zoo.from_pretrained` calls it for any checkpoint whose
``config.json`` has a ``model_type``. One small module per family: :mod:`.dense` (llama, mistral,
qwen2, qwen3), :mod:`.sparse` (mixtral, qwen2_moe, qwen3_moe, olmoe), :mod:`.deepseek` (deepseek_v3), :mod:`.native` (zoo's own
transformers form, ``model_type: zoo``);
:mod:`.common` holds the shared mapping (rope scalings included) and :mod:`.quantized` dequantises fp8
checkpoints first. Options a family module does not support fail with the supported values.
"""

from __future__ import annotations

import torch

from zoo.checkpoint.importers import deepseek, dense, native, sparse
from zoo.checkpoint.importers.common import HFConfig, Tensors
from zoo.checkpoint.importers.quantized import dequantize_fp8
from zoo.errors import CheckpointError, ConfigError
from zoo.model.config import ModelConfig

CONVERTERS = {"llama": dense.convert, "mistral": dense.convert, "qwen2": dense.convert, "qwen3": dense.convert,
              "mixtral": sparse.convert, "qwen2_moe": sparse.convert, "qwen3_moe": sparse.convert,
              "olmoe": sparse.convert, "deepseek_v3": deepseek.convert, native.MODEL_TYPE: native.convert}


def supported_model_types() -> list[str]:
    return sorted(CONVERTERS)


def convert_checkpoint(hf_config: dict, state_dict: dict[str, torch.Tensor],
                       source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The zoo model config and state dict of a transformers checkpoint of a supported ``model_type``."""
    model_type = hf_config.get("model_type")
    if model_type not in CONVERTERS:
        raise CheckpointError(f"{source}: transformers model_type {model_type!r} cannot be imported; "
                              f"supported: {', '.join(supported_model_types())}")
    tensors = Tensors(dequantize_fp8(hf_config, state_dict, source), source)
    raw = CONVERTERS[model_type](HFConfig(hf_config, source), tensors)
    try:
        config = ModelConfig.from_dict(raw["model"])
    except ConfigError as err:
        raise CheckpointError(f"{source}: the {model_type} config maps to an invalid zoo config: {err}") from err
    return config, tensors.finish()
