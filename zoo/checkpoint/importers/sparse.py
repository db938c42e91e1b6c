"""Mixture-of-Experts Llama-family checkpoints: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``.

Each maps onto zoo's ``moe`` FFN with its own routing rule: Mixtral takes the float32
softmax over all experts, the top-k, and always renormalises them; Qwen2-MoE, Qwen3-MoE and OLMoE renormalise
only with ``norm_topk_prob``; Qwen2-MoE adds a shared expert scaled by ``sigmoid(Linear(d -> 1))``; the Qwen
MoEs can keep some layers dense (``mlp_only_layers``, ``decoder_sparse_step``). OLMoE normalises the full q
and k projections (``qk_norm``), Qwen3-MoE each head of them (``qk_norm_scope: head``). Attention is the zoo
GQA block (Qwen2-MoE with q/k/v biases).
"""

from __future__ import annotations

from zoo.checkpoint.importers.common import (HFConfig, Tensors, attention_options, check_dense_options, decoder_config,
                                embeddings_and_head, experts, gqa_attention, layer_norms, swiglu)


def convert(config: HFConfig, t: Tensors) -> dict:
    check_dense_options(config)
    family = config.model_type
    n_layers = config.require("num_hidden_layers")
    top_k = config.require("num_experts_per_tok")
    qkv_bias, max_seq_len, dense_layers = False, None, set()
    if family == "mixtral":
        n_experts = config.require("num_local_experts")
        moe = {"n_experts": n_experts, "top_k": top_k, "d_hidden": config.require("intermediate_size"),
               "score_func": "softmax", "norm_topk_prob": True}
        if config.raw.get("sliding_window"):
            max_seq_len = min(config.raw["sliding_window"], config.get("max_position_embeddings", 4096))
    elif family in ("qwen2_moe", "qwen3_moe"):
        config.only("use_sliding_window", (False,))
        # the released configs say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts
        n_experts = config.get("num_experts") or config.require("num_local_experts")
        moe = {"n_experts": n_experts, "top_k": top_k, "d_hidden": config.require("moe_intermediate_size"),
               "score_func": "softmax", "norm_topk_prob": bool(config.get("norm_topk_prob", False))}
        if family == "qwen2_moe":
            qkv_bias = bool(config.get("qkv_bias", True))
            moe.update(n_shared_experts=1, d_shared_hidden=config.require("shared_expert_intermediate_size"),
                       shared_expert_gate=True)
        else:
            config.only("attention_bias", (False,))
        step = config.get("decoder_sparse_step", 1)
        dense_layers = {i for i in range(n_layers)
                        if i in config.get("mlp_only_layers", []) or (i + 1) % step}
    else:  # olmoe
        config.only("clip_qkv", (None,))
        config.only("attention_bias", (False,))
        n_experts = config.require("num_experts")
        moe = {"n_experts": n_experts, "top_k": top_k, "d_hidden": config.require("intermediate_size"),
               "score_func": "softmax", "norm_topk_prob": bool(config.get("norm_topk_prob", False))}
    mixer = attention_options(config, qkv_bias)
    qk_norm = family in ("olmoe", "qwen3_moe")
    if family == "olmoe":
        mixer.update(qk_norm=True, qk_norm_eps=float(config.get("rms_norm_eps", 1e-5)))
    elif family == "qwen3_moe":
        mixer.update(qk_norm=True, qk_norm_scope="head", qk_norm_eps=float(config.get("rms_norm_eps", 1e-6)))
    embeddings_and_head(config, t)
    for i in range(n_layers):
        layer_norms(t, i)
        gqa_attention(t, i, qkv_bias, qk_norm)
        src, dst = f"model.layers.{i}.mlp", f"blocks.{i}.ffn"
        if i in dense_layers:
            swiglu(t, src, dst)
            continue
        if family == "mixtral" and t.has(f"model.layers.{i}.block_sparse_moe.gate.weight"):
            src = f"model.layers.{i}.block_sparse_moe"  # the original Mixtral names
            experts(t, f"{src}.experts", f"{dst}.experts", n_experts, ("w1", "w3", "w2"))
        else:
            experts(t, f"{src}.experts", f"{dst}.experts", n_experts, ("gate_proj", "up_proj", "down_proj"))
        t.move(f"{src}.gate.weight", f"{dst}.router.weight")
        if family == "qwen2_moe":
            swiglu(t, f"{src}.shared_expert", f"{dst}.shared")
            t.move(f"{src}.shared_expert_gate.weight", f"{dst}.shared_gate.weight")
    layers = {i: {"ffn": {"type": "mlp", "d_hidden": config.require("intermediate_size")}} for i in sorted(dense_layers)}
    return decoder_config(config, mixer, {"type": "moe", **moe}, layers, max_seq_len)
