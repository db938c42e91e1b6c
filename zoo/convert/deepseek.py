"""DeepSeek-V3 checkpoints (``deepseek_v3``): Multi-head Latent Attention and sigmoid-routed MoE.

Attention maps onto zoo's ``mla`` mixer. DeepSeek stores the rope dimensions of queries and of the
shared rope key as interleaved pairs ``(x0, x1), (x2, x3), ...`` (``rope_interleave``); zoo's rope
rotates ``(x_i, x_{i + d/2})``, so those weight rows are permuted once at import (evens, then odds),
which leaves every ``q . k`` unchanged. The FFN of the first ``first_k_dense_replace`` layers is a
dense SwiGLU; the others are zoo's ``moe``: sigmoid scores, ``e_score_correction_bias`` added for
selection only (zoo's loss-free ``expert_bias``), group-limited top-k, weights from the unbiased
scores normalised and scaled by ``routed_scaling_factor``, plus shared experts (DESIGN §8).

The multi-token-prediction layer(s) released with DeepSeek-V3 (``model.layers.{n_layers}...``) are
skipped with a warning: zoo's MTP import is not there yet.
"""

from __future__ import annotations

import re
import warnings

import torch

from zoo.convert.common import (HFConfig, Tensors, check_dense_options, decoder_config, embeddings_and_head,
                                experts, layer_norms, rope_theta, swiglu)


def convert(config: HFConfig, t: Tensors) -> dict:
    check_dense_options(config)
    if config.raw.get("quantization_config"):
        raise config.unsupported("quantization_config", config.raw["quantization_config"].get("quant_method"),
                                 "none (dequantise the fp8 weights to bf16 first)")
    config.only("attention_bias", (False,))
    n_layers = config.require("num_hidden_layers")
    heads = config.require("num_attention_heads")
    nope, rope, v_dim = (config.require(k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    q_lora_rank, kv_lora_rank = config.raw.get("q_lora_rank"), config.require("kv_lora_rank")
    mixer = {"type": "mla", "n_heads": heads, "q_lora_rank": q_lora_rank, "kv_lora_rank": kv_lora_rank,
             "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v_dim,
             "rope_theta": rope_theta(config), "norm_eps": float(config.get("rms_norm_eps", 1e-6))}
    n_experts = config.require("n_routed_experts")
    d_expert = config.require("moe_intermediate_size")
    n_shared = config.get("n_shared_experts", 0)
    moe = {"type": "moe", "n_experts": n_experts, "top_k": config.require("num_experts_per_tok"),
           "d_hidden": d_expert, "score_func": "sigmoid", "norm_topk_prob": bool(config.get("norm_topk_prob", True)),
           "routed_scaling_factor": float(config.get("routed_scaling_factor", 1.0)),
           "n_group": config.get("n_group", 1), "topk_group": config.get("topk_group", 1),
           "n_shared_experts": n_shared, "d_shared_hidden": d_expert * n_shared or None, "loss_free_bias": True}
    first_dense = min(config.get("first_k_dense_replace", 0), n_layers)
    interleaved = bool(config.get("rope_interleave", True))

    mtp = t.drop(lambda k: (m := re.match(r"model\.layers\.(\d+)\.", k)) is not None and int(m[1]) >= n_layers)
    if mtp:
        warnings.warn(f"{t.source}: skipping the DeepSeek-V3 multi-token-prediction layer(s) "
                      f"({len(mtp)} tensors under model.layers.{n_layers}+): zoo does not import MTP yet",
                      stacklevel=3)

    def q_rows(weight: torch.Tensor) -> torch.Tensor:  # per head: nope rows, then rope rows
        return _deinterleave(weight, heads, nope + rope, nope) if interleaved else weight

    embeddings_and_head(config, t)
    for i in range(n_layers):
        layer_norms(t, i)
        src, dst = f"model.layers.{i}.self_attn", f"blocks.{i}.mixer"
        if q_lora_rank is None:
            t.put(f"{dst}.q_proj.weight", q_rows(t.take(f"{src}.q_proj.weight")))
        else:
            t.move(f"{src}.q_a_proj.weight", f"{dst}.q_down.weight")
            t.move(f"{src}.q_a_layernorm.weight", f"{dst}.q_norm.weight")
            t.put(f"{dst}.q_up.weight", q_rows(t.take(f"{src}.q_b_proj.weight")))
        kv_down = t.take(f"{src}.kv_a_proj_with_mqa.weight")
        t.put(f"{dst}.kv_down.weight", _deinterleave(kv_down, 1, kv_lora_rank + rope, kv_lora_rank)
              if interleaved else kv_down)
        t.move(f"{src}.kv_a_layernorm.weight", f"{dst}.kv_norm.weight")
        t.move(f"{src}.kv_b_proj.weight", f"{dst}.kv_up.weight")
        t.move(f"{src}.o_proj.weight", f"{dst}.out.weight")

        src, dst = f"model.layers.{i}.mlp", f"blocks.{i}.ffn"
        if i < first_dense:
            swiglu(t, src, dst)
            continue
        experts(t, f"{src}.experts", f"{dst}.experts", n_experts, ("gate_proj", "up_proj", "down_proj"))
        t.move(f"{src}.gate.weight", f"{dst}.router.weight")
        t.put(f"{dst}.router.expert_bias", t.take(f"{src}.gate.e_score_correction_bias").float())
        if n_shared:
            swiglu(t, f"{src}.shared_experts", f"{dst}.shared")
    dense = {"type": "mlp", "d_hidden": config.require("intermediate_size")}
    if first_dense == n_layers:
        return decoder_config(config, mixer, dense)
    return decoder_config(config, mixer, moe, {i: {"ffn": dense} for i in range(first_dense)})


def _deinterleave(weight: torch.Tensor, groups: int, group_rows: int, rope_start: int) -> torch.Tensor:
    """Reorder the rope rows ``rope_start:`` of each of ``groups`` row groups from interleaved pairs to
    halves (rows 0, 2, 4, ... then 1, 3, 5, ...)."""
    w = weight.view(groups, group_rows, -1)
    rope = w[:, rope_start:]
    return torch.cat((w[:, :rope_start], rope[:, 0::2], rope[:, 1::2]), dim=1).reshape(weight.shape)
