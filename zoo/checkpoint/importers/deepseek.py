"""DeepSeek-V3 checkpoints (``deepseek_v3``): Multi-head Latent Attention and sigmoid-routed MoE.

Attention maps onto zoo's ``mla`` mixer. DeepSeek stores the rope dimensions of queries and of the
shared rope key as interleaved pairs ``(x0, x1), (x2, x3), ...`` (``rope_interleave``); zoo's rope
rotates ``(x_i, x_{i + d/2})``, so those weight rows are permuted once at import (evens, then odds),
which leaves every ``q . k`` unchanged. The FFN of the first ``first_k_dense_replace`` layers is a
dense SwiGLU; the others are zoo's ``moe``: sigmoid scores, ``e_score_correction_bias`` added for
selection only (zoo's loss-free ``expert_bias``), group-limited top-k, weights from the unbiased
scores normalised and scaled by ``routed_scaling_factor``, plus shared experts.

The multi-token-prediction layers released with DeepSeek-V3 (``model.layers.{n_layers + k - 1}``, ``k = 1 ..
num_nextn_predict_layers``) become zoo's sequential MTP modules (``model.mtp``, :mod:`zoo.blocks.mtp`):
``enorm`` / ``hnorm`` / ``eh_proj`` are the embedding norm, hidden-state norm and 2d -> d projection (embedding
first, as zoo concatenates), ``shared_head.norm`` the module's final norm, and the block is converted like a
main-model layer (a MoE layer, whatever ``first_k_dense_replace`` says, as in DeepSeek's inference code). The
layer's own copies of the embedding and output head (``embed_tokens``, ``shared_head.head``) must equal the main
model's, which zoo shares; when they differ the MTP layers are skipped with a warning. transformers itself
drops these layers, so checkpoints saved by transformers import without MTP.

DeepSeek-V3's YaRN rope (``rope_scaling: {type: yarn, mscale, mscale_all_dim, ...}``) becomes the MLA mixer's
``rope_scaling``; its fp8 weights are dequantised before this module sees them (:mod:`.quantized`).
"""

from __future__ import annotations

import re
import warnings

import torch

from zoo.checkpoint.importers.common import (HFConfig, Tensors, check_dense_options, decoder_config, embeddings_and_head,
                                experts, rope_options, swiglu)
from zoo.errors import CheckpointError

# The eps of the MLA latent norms (q_a_layernorm, kv_a_layernorm): transformers' DeepseekV3Attention builds
# them with DeepseekV3RMSNorm's default 1e-6, not rms_norm_eps (which only the decoder-layer norms use).
LATENT_NORM_EPS = 1e-6


def convert(config: HFConfig, t: Tensors) -> dict:
    check_dense_options(config)
    config.only("attention_bias", (False,))
    n_layers = config.require("num_hidden_layers")
    heads = config.require("num_attention_heads")
    nope, rope, v_dim = (config.require(k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    q_lora_rank, kv_lora_rank = config.raw.get("q_lora_rank"), config.require("kv_lora_rank")
    mixer = {"type": "mla", "n_heads": heads, "q_lora_rank": q_lora_rank, "kv_lora_rank": kv_lora_rank,
             "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v_dim,
             **rope_options(config), "norm_eps": LATENT_NORM_EPS}
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

    def q_rows(weight: torch.Tensor) -> torch.Tensor:  # per head: nope rows, then rope rows
        return _deinterleave(weight, heads, nope + rope, nope) if interleaved else weight

    def block(src: str, dst: str, dense_ffn: bool) -> None:
        """One decoder layer ``src`` (HF prefix) -> a zoo :class:`~zoo.model.Block` ``dst``."""
        t.move(f"{src}.input_layernorm.weight", f"{dst}.mixer_norm.weight")
        t.move(f"{src}.post_attention_layernorm.weight", f"{dst}.ffn_norm.weight")
        src_attn, dst_attn = f"{src}.self_attn", f"{dst}.mixer"
        if q_lora_rank is None:
            t.put(f"{dst_attn}.q_proj.weight", q_rows(t.take(f"{src_attn}.q_proj.weight")))
        else:
            t.move(f"{src_attn}.q_a_proj.weight", f"{dst_attn}.q_down.weight")
            t.move(f"{src_attn}.q_a_layernorm.weight", f"{dst_attn}.q_norm.weight")
            t.put(f"{dst_attn}.q_up.weight", q_rows(t.take(f"{src_attn}.q_b_proj.weight")))
        kv_down = t.take(f"{src_attn}.kv_a_proj_with_mqa.weight")
        t.put(f"{dst_attn}.kv_down.weight", _deinterleave(kv_down, 1, kv_lora_rank + rope, kv_lora_rank)
              if interleaved else kv_down)
        t.move(f"{src_attn}.kv_a_layernorm.weight", f"{dst_attn}.kv_norm.weight")
        t.move(f"{src_attn}.kv_b_proj.weight", f"{dst_attn}.kv_up.weight")
        t.move(f"{src_attn}.o_proj.weight", f"{dst_attn}.out.weight")
        src_ffn, dst_ffn = f"{src}.mlp", f"{dst}.ffn"
        if dense_ffn:
            swiglu(t, src_ffn, dst_ffn)
            return
        experts(t, f"{src_ffn}.experts", f"{dst_ffn}.experts", n_experts, ("gate_proj", "up_proj", "down_proj"))
        t.move(f"{src_ffn}.gate.weight", f"{dst_ffn}.router.weight")
        t.put(f"{dst_ffn}.router.expert_bias", t.take(f"{src_ffn}.gate.e_score_correction_bias").float())
        if n_shared:
            swiglu(t, f"{src_ffn}.shared_experts", f"{dst_ffn}.shared")

    embeddings_and_head(config, t)
    for i in range(n_layers):
        block(f"model.layers.{i}", f"blocks.{i}", dense_ffn=i < first_dense)
    mtp_depth = _mtp_depth(config, t, n_layers)
    for k in range(mtp_depth):
        src, dst = f"model.layers.{n_layers + k}", f"mtp.layers.{k}"
        t.move(f"{src}.enorm.weight", f"{dst}.embed_norm.weight")
        t.move(f"{src}.hnorm.weight", f"{dst}.hidden_norm.weight")
        t.move(f"{src}.eh_proj.weight", f"{dst}.proj.weight")
        t.move(f"{src}.shared_head.norm.weight", f"{dst}.norm.weight")
        block(src, f"{dst}.block", dense_ffn=False)

    dense = {"type": "mlp", "d_hidden": config.require("intermediate_size")}
    if first_dense == n_layers:
        zoo_config = decoder_config(config, mixer, dense)
    else:
        zoo_config = decoder_config(config, mixer, moe, {i: {"ffn": dense} for i in range(first_dense)})
    if mtp_depth:
        zoo_config["model"]["mtp"] = {"depth": mtp_depth, "heads": "sequential",
                                      **({"ffn": moe} if first_dense == n_layers else {})}
    return zoo_config


def _mtp_depth(config: HFConfig, t: Tensors, n_layers: int) -> int:
    """How many MTP layers to import (the layers indexed ``n_layers`` and up); their copies of the shared
    embedding and head are checked against the main model's and dropped. 0, with the layers dropped and a
    warning, when a copy differs."""
    def layer_index(name: str) -> int | None:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return int(m[1]) if m and int(m[1]) >= n_layers else None

    found = sorted({i for k in list(t.hf) if (i := layer_index(k)) is not None})
    if not found:
        return 0
    expected = config.get("num_nextn_predict_layers", len(found))
    if found != list(range(n_layers, n_layers + expected)):
        raise CheckpointError(f"{t.source}: multi-token-prediction layers model.layers.{found} do not match "
                              f"num_nextn_predict_layers={expected} (expected model.layers.{n_layers}.."
                              f"{n_layers + expected - 1})")
    main_head = t.zoo.get("head.weight", t.zoo["embed.weight"])
    for i in found:
        for own, shared in ((f"model.layers.{i}.embed_tokens.weight", t.zoo["embed.weight"]),
                            (f"model.layers.{i}.shared_head.head.weight", main_head)):
            if t.has(own) and not torch.equal(t.hf[own], shared):
                dropped = t.drop(lambda k: layer_index(k) is not None)
                warnings.warn(f"{t.source}: skipping the DeepSeek-V3 multi-token-prediction layers ({len(dropped)} "
                              f"tensors): {own} differs from the main model's, which zoo's MTP modules share",
                              stacklevel=5)
                return 0
            t.drop(lambda k: k == own)
    return len(found)


def _deinterleave(weight: torch.Tensor, groups: int, group_rows: int, rope_start: int) -> torch.Tensor:
    """Reorder the rope rows ``rope_start:`` of each of ``groups`` row groups from interleaved pairs to
    halves (rows 0, 2, 4, ... then 1, 3, 5, ...)."""
    w = weight.view(groups, group_rows, -1)
    rope = w[:, rope_start:]
    return torch.cat((w[:, :rope_start], rope[:, 0::2], rope[:, 1::2]), dim=1).reshape(weight.shape)
