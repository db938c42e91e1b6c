"""Dense Llama-family checkpoints: ``llama``, ``mistral``, ``qwen2``.

All three are the zoo dense decoder: RMSNorm pre-norm blocks, GQA attention with half-layout rope (the
layout zoo's rope uses, so no permutation), SwiGLU. Qwen2 adds biases on q, k, v (zoo's ``qkv_bias``).
Mistral's sliding window equals full attention up to the window length, so the imported model's
``max_seq_len`` is capped at the window.
"""

from __future__ import annotations

from zoo.checkpoint.importers.common import (HFConfig, Tensors, attention_options, check_dense_options, decoder_config,
                                embeddings_and_head, gqa_attention, layer_norms, swiglu)


def convert(config: HFConfig, t: Tensors) -> dict:
    check_dense_options(config)
    max_seq_len = None
    if config.model_type == "llama":
        config.only("attention_bias", (False,))
        mlp_bias = bool(config.get("mlp_bias", False))
        qkv_bias = False
    elif config.model_type == "mistral":
        mlp_bias, qkv_bias = False, False
        window = config.raw.get("sliding_window")
        if window:
            max_seq_len = min(window, config.get("max_position_embeddings", window))
    else:  # qwen2: biased q, k, v; sliding-window layers are not supported
        config.only("use_sliding_window", (False,))
        mlp_bias, qkv_bias = False, True
    mixer = attention_options(config, qkv_bias)
    ffn = {"type": "mlp", "d_hidden": config.require("intermediate_size"), "bias": mlp_bias}
    embeddings_and_head(config, t)
    for i in range(config.raw["num_hidden_layers"]):
        layer_norms(t, i)
        gqa_attention(t, i, qkv_bias)
        swiglu(t, f"model.layers.{i}.mlp", f"blocks.{i}.ffn", mlp_bias)
    return decoder_config(config, mixer, ffn, max_seq_len=max_seq_len)
