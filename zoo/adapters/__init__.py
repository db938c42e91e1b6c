"""Parameter-efficient fine-tuning: adapters applied to a built model (registry kind ``adapter``).

``model.adapter: {type: lora, r: 8, ...}`` in a config, or :func:`add_adapter` on a loaded model; the
built-in adapter is ``lora`` (:mod:`zoo.adapters.lora`, with ``dora`` and ``base_quant: nf4`` options).
See :mod:`zoo.adapters.base` for the seam.
"""

from zoo.adapters.base import (AdapterModule, adapter_disabled, adapter_modules, adapter_spec, adapter_state_dict,
                               add_adapter, apply_adapter, has_adapter, merge_adapter)
from zoo.adapters.lora import DEFAULT_TARGETS, LoRA, LoRAConfig, LoRALinear
from zoo.adapters.experts import LoRAExperts

__all__ = ["AdapterModule", "DEFAULT_TARGETS", "LoRA", "LoRAConfig", "LoRAExperts", "LoRALinear", "adapter_disabled",
           "adapter_modules", "adapter_spec", "adapter_state_dict", "add_adapter", "apply_adapter", "has_adapter",
           "merge_adapter"]
