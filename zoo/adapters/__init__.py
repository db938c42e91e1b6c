"""Parameter-efficient fine-tuning: adapters applied to a built model (registry kind ``adapter``).

``model.adapter: {type: lora, r: 8, ...}`` in a config, or :func:`add_adapter` on a loaded model; the
built-in adapters are ``lora`` (:mod:`zoo.adapters.lora`, with ``dora`` and ``base_quant: nf4`` options),
``prompt_tuning`` (:mod:`zoo.adapters.prompt`) and ``prefix_tuning`` (:mod:`zoo.adapters.prefix`).
See :mod:`zoo.adapters.base` for the seam.
"""

from zoo.adapters.base import (AdapterModule, adapter_disabled, adapter_modules, adapter_spec, adapter_state_dict,
                               add_adapter, apply_adapter, has_adapter, merge_adapter)
from zoo.adapters.lora import DEFAULT_TARGETS, LoRA, LoRAConfig, LoRALinear
from zoo.adapters.experts import LoRAExperts
from zoo.adapters.prefix import (InitialStateRetention, PrefixAttention, PrefixEncoder, PrefixMLA, PrefixTuning,
                                 PrefixTuningConfig, fold_reparam)
from zoo.adapters.prompt import PromptEmbeddings, PromptTuning, PromptTuningConfig

__all__ = ["AdapterModule", "DEFAULT_TARGETS", "InitialStateRetention", "LoRA", "LoRAConfig", "LoRAExperts",
           "LoRALinear", "PrefixAttention", "PrefixEncoder", "PrefixMLA", "PrefixTuning", "PrefixTuningConfig",
           "PromptEmbeddings", "PromptTuning", "PromptTuningConfig", "adapter_disabled", "adapter_modules",
           "adapter_spec", "adapter_state_dict", "add_adapter", "apply_adapter", "has_adapter", "fold_reparam",
           "merge_adapter"]
