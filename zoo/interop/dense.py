"""Export to the dense Llama families: ``llama``, ``qwen2``, ``qwen3`` and (by name) ``mistral``; the inverse of
:mod:`zoo.checkpoint.importers.dense`.

All four are zoo's dense decoder: GQA attention with half-layout rope (no permutation) and SwiGLU in every
layer. ``qkv_bias`` makes a model Qwen2 (Llama's ``attention_bias`` also biases the output projection, which
zoo has not); a per-head q/k RMSNorm (``qk_norm`` with ``qk_norm_scope: head`` and the model's norm eps)
makes it Qwen3; ``mlp.bias`` is Llama's ``mlp_bias``. Mistral holds the same tensors as Llama; its export
writes ``sliding_window: null`` (full attention, which the imported model already equals up to its
``max_seq_len``), so it is chosen only when asked for.
"""

from __future__ import annotations

from zoo.interop import mapping
from zoo.interop.layout import Family, Layout, attention_config, attention_problems, base_config, mlp_problems
from zoo.interop.mapping import ZooTensors


def _problems(qkv_bias: bool, qk_norm: str | None, mlp_bias: bool | None):
    def problems(layout: Layout) -> list[str]:
        found = attention_problems(layout, qkv_bias, qk_norm) + mlp_problems(layout, mlp_bias)
        if layout.moe is not None:
            found.append(f"{layout.describe('moe')}: routed experts (a dense family has none)")
        return found
    return problems


def _config(layout: Layout, family: Family) -> dict:
    mlp = layout.mlp.options
    config = {**base_config(layout, family), **attention_config(layout),
              "intermediate_size": mlp.hidden_size(layout.d_model)}
    if family.name == "llama":
        config.update(mlp_bias=mlp.bias, pretraining_tp=1)
    elif family.name == "mistral":
        config.update(sliding_window=None)
    else:  # the Qwens: full attention in every layer
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layout.config.n_layers)
        if family.name == "qwen2":
            del config["attention_bias"]
    return config


def _tensors(layout: Layout, t: ZooTensors) -> None:
    config = layout.config
    for i in mapping.attention_layers(t, layout.mixer.options, layout.d_model, config.n_layers, config.tie_embeddings):
        mapping.swiglu(t, f"blocks.{i}.ffn", f"model.layers.{i}.mlp", layout.mlp.options.bias)


def _family(name: str, architecture: str, qkv_bias: bool, mlp_bias: bool | None, qk_norm: str | None = None,
            automatic: bool = True) -> Family:
    family = Family(name, architecture, _problems(qkv_bias, qk_norm, mlp_bias), lambda layout: _config(layout, family),
                    _tensors, automatic=automatic)
    return family


LLAMA = _family("llama", "LlamaForCausalLM", qkv_bias=False, mlp_bias=None)
QWEN2 = _family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, mlp_bias=False)
QWEN3 = _family("qwen3", "Qwen3ForCausalLM", qkv_bias=False, mlp_bias=False, qk_norm="head")
MISTRAL = _family("mistral", "MistralForCausalLM", qkv_bias=False, mlp_bias=False, automatic=False)
