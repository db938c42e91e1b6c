"""Dense Llama-family checkpoints: ``llama``, ``mistral``, ``qwen2``, ``qwen3``.

All are the zoo dense decoder: RMSNorm pre-norm blocks, GQA attention with half-layout rope (the
layout zoo's rope uses, so no permutation), SwiGLU. Qwen2 adds biases on q, k, v (zoo's ``qkv_bias``);
Qwen3 instead RMS-normalises each head of q and k before the rope (zoo's ``qk_norm`` with
``qk_norm_scope: head``, eps ``rms_norm_eps``). Mistral's sliding window equals full attention up to the
window length, so the imported model's ``max_seq_len`` is capped at the window.
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
    elif config.model_type == "qwen2":  # biased q, k, v; sliding-window layers are not supported
        config.only("use_sliding_window", (False,))
        mlp_bias, qkv_bias = False, True
    else:  # qwen3: per-head q/k norms; biases (on o_proj too) and sliding-window layers are not supported
        config.only("use_sliding_window", (False,))
        config.only("attention_bias", (False,))
        mlp_bias, qkv_bias = False, False
    qk_norm = config.model_type == "qwen3"
    mixer = attention_options(config, qkv_bias)
    if qk_norm:
        mixer.update(qk_norm=True, qk_norm_scope="head", qk_norm_eps=float(config.get("rms_norm_eps", 1e-6)))
    ffn = {"type": "mlp", "d_hidden": config.require("intermediate_size"), "bias": mlp_bias}
    embeddings_and_head(config, t)
    for i in range(config.raw["num_hidden_layers"]):
        layer_norms(t, i)
        gqa_attention(t, i, qkv_bias, qk_norm)
        swiglu(t, f"model.layers.{i}.mlp", f"blocks.{i}.ffn", mlp_bias)
    return decoder_config(config, mixer, ffn, max_seq_len=max_seq_len)
