"""Export to ``deepseek_v3``: Multi-head Latent Attention and sigmoid-routed MoE; the inverse of
:mod:`zoo.checkpoint.importers.deepseek`.

zoo's ``mla`` mixer becomes DeepSeek's attention, its rope rows interleaved again (``rope_interleave``);
the ``moe`` FFN becomes DeepSeek's router and experts: sigmoid scores, the loss-free balancing bias as
``e_score_correction_bias`` (zeros for a model trained without it: selection is then unbiased, as in zoo),
group-limited top-k, ``routed_scaling_factor``, and ``n_shared_experts`` always-on experts of width
``n_shared_experts * moe_intermediate_size``. Dense layers must be the first ones (``first_k_dense_replace``).
Multi-token prediction modules are written as DeepSeek released them (``model.layers.{n_layers + k}``, with
copies of the shared embedding and head); transformers skips those layers when it loads the model.
"""

from __future__ import annotations

import torch

from zoo.checkpoint.importers.deepseek import LATENT_NORM_EPS
from zoo.interop import mapping
from zoo.interop.layout import Family, Layout, base_config, mlp_problems, option_problems, require, rope_config
from zoo.interop.mapping import ZooTensors

_MOE = {"n_experts", "top_k", "d_hidden", "score_func", "norm_topk_prob", "routed_scaling_factor", "n_group",
        "topk_group", "n_shared_experts", "d_shared_hidden", "shared_expert_gate", "loss_free_bias"}


def _problems(layout: Layout) -> list[str]:
    where = layout.describe("mixer")
    if layout.mixer.type != "mla":
        return [f"{where}: needs mixer 'mla'"]
    mla = layout.mixer.options
    problems = option_problems(layout.mixer, {"n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                              "qk_rope_head_dim", "v_head_dim", "rope_theta", "rope_scaling",
                                              "norm_eps"}, where)
    require(problems, mla.norm_eps == LATENT_NORM_EPS, f"{where}: norm_eps={mla.norm_eps!r} (DeepSeek-V3 fixes the "
                                                       f"latent norms' eps at {LATENT_NORM_EPS})")
    problems += mlp_problems(layout, bias=False)
    require(problems, layout.dense_layers == list(range(len(layout.dense_layers))),
            f"model.layers: dense layers {layout.dense_layers} are not the first ones (first_k_dense_replace)")
    moe = _routed(layout)
    if moe is not None:
        where = layout.describe("moe") if layout.moe is not None else "model.mtp.ffn (moe)"
        options = moe.options
        problems += option_problems(moe, _MOE, where)
        d_expert = options.hidden_size(layout.d_model)
        for ok, option in ((options.score_func == "sigmoid", "score_func"),
                           (not options.shared_expert_gate, "shared_expert_gate"),
                           (options.d_shared_hidden in (None, options.n_shared_experts * d_expert), "d_shared_hidden")):
            require(problems, ok, f"{where}: {option}={getattr(options, option)!r}")
    mtp = layout.config.mtp
    if mtp is not None:
        require(problems, mtp.heads == "sequential", f"model.mtp: heads={mtp.heads!r} (DeepSeek-V3 chains them)")
        require(problems, mtp.mixer in (None, layout.mixer), "model.mtp.mixer: differs from model.mixer")
        require(problems, moe is not None and _mtp_ffn(layout) == moe,
                "model.mtp.ffn: DeepSeek-V3's MTP layers use the model's routed 'moe' FFN")
    return problems


def _routed(layout: Layout):
    """The routed FFN spec: the main model's, else the MTP modules' (a model whose layers are all dense)."""
    if layout.moe is not None:
        return layout.moe
    ffn = _mtp_ffn(layout)
    return ffn if ffn is not None and ffn.type == "moe" else None


def _mtp_ffn(layout: Layout):
    mtp = layout.config.mtp
    return None if mtp is None else (mtp.ffn or layout.config.ffn)


def _config(layout: Layout, family: Family) -> dict:
    mla, config = layout.mixer.options, layout.config
    moe = _routed(layout)
    dense = layout.mlp.options.hidden_size(layout.d_model) if layout.mlp is not None else None
    hf = {**base_config(layout, family), **rope_config(mla), "num_attention_heads": mla.n_heads,
          "num_key_value_heads": mla.n_heads, "q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank,
          "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
          "v_head_dim": mla.v_head_dim, "rope_interleave": True, "attention_bias": False, "pretraining_tp": 1,
          "first_k_dense_replace": len(layout.dense_layers), "num_nextn_predict_layers": config.mtp.depth if config.mtp else 0}
    if moe is None:  # every layer dense: the routed-expert keys are read but build nothing
        hf.update(intermediate_size=dense, moe_intermediate_size=dense, n_routed_experts=1, num_experts_per_tok=1,
                  n_shared_experts=0, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
        return hf
    options = moe.options
    d_expert = options.hidden_size(layout.d_model)
    hf.update(intermediate_size=dense or d_expert, moe_intermediate_size=d_expert, n_routed_experts=options.n_experts,
              num_experts_per_tok=options.top_k, n_shared_experts=options.n_shared_experts, n_group=options.n_group,
              topk_group=options.topk_group, norm_topk_prob=options.norm_topk_prob,
              routed_scaling_factor=options.routed_scaling_factor)
    return hf


def _block(layout: Layout, t: ZooTensors, src: str, dst: str, dense: bool) -> None:
    """One zoo :class:`~zoo.model.Block` ``src`` -> a DeepSeek decoder layer ``dst``."""
    mla = layout.mixer.options
    heads, nope, rope = mla.n_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim
    t.move(f"{src}.mixer_norm.weight", f"{dst}.input_layernorm.weight")
    t.move(f"{src}.ffn_norm.weight", f"{dst}.post_attention_layernorm.weight")
    attn, hf_attn = f"{src}.mixer", f"{dst}.self_attn"
    if mla.q_lora_rank is None:
        t.put(f"{hf_attn}.q_proj.weight", mapping.interleave(t.take(f"{attn}.q_proj.weight"), heads, nope + rope, nope))
    else:
        t.move(f"{attn}.q_down.weight", f"{hf_attn}.q_a_proj.weight")
        t.move(f"{attn}.q_norm.weight", f"{hf_attn}.q_a_layernorm.weight")
        t.put(f"{hf_attn}.q_b_proj.weight", mapping.interleave(t.take(f"{attn}.q_up.weight"), heads, nope + rope, nope))
    kv_down = t.take(f"{attn}.kv_down.weight")
    t.put(f"{hf_attn}.kv_a_proj_with_mqa.weight", mapping.interleave(kv_down, 1, mla.kv_lora_rank + rope, mla.kv_lora_rank))
    t.move(f"{attn}.kv_norm.weight", f"{hf_attn}.kv_a_layernorm.weight")
    t.move(f"{attn}.kv_up.weight", f"{hf_attn}.kv_b_proj.weight")
    t.move(f"{attn}.out.weight", f"{hf_attn}.o_proj.weight")
    ffn, mlp = f"{src}.ffn", f"{dst}.mlp"
    if dense:
        mapping.swiglu(t, ffn, mlp)
        return
    mapping.experts(t, f"{ffn}.experts", f"{mlp}.experts", ("gate_proj", "up_proj", "down_proj"))
    router = t.take(f"{ffn}.router.weight")
    t.put(f"{mlp}.gate.weight", router)
    bias = f"{ffn}.router.expert_bias"
    t.put(f"{mlp}.gate.e_score_correction_bias",
          t.take(bias) if bias in t.zoo else torch.zeros(router.shape[0], dtype=torch.float32))
    if f"{ffn}.shared.gate_up.weight" in t.zoo:
        mapping.swiglu(t, f"{ffn}.shared", f"{mlp}.shared_experts")


def _tensors(layout: Layout, t: ZooTensors) -> None:
    config = layout.config
    mapping.embeddings_and_head(t, config.tie_embeddings)
    for i in range(config.n_layers):
        _block(layout, t, f"blocks.{i}", f"model.layers.{i}", dense=i in layout.dense_layers)
    embed = t.hf["model.embed_tokens.weight"]
    head = t.hf.get("lm_head.weight", embed)
    for k in range(config.mtp.depth if config.mtp else 0):
        src, dst = f"mtp.layers.{k}", f"model.layers.{config.n_layers + k}"
        t.move(f"{src}.embed_norm.weight", f"{dst}.enorm.weight")
        t.move(f"{src}.hidden_norm.weight", f"{dst}.hnorm.weight")
        t.move(f"{src}.proj.weight", f"{dst}.eh_proj.weight")
        t.move(f"{src}.norm.weight", f"{dst}.shared_head.norm.weight")
        t.put(f"{dst}.embed_tokens.weight", embed.clone())
        t.put(f"{dst}.shared_head.head.weight", head.clone())
        _block(layout, t, f"{src}.block", dst, dense=False)


DEEPSEEK_V3 = Family("deepseek_v3", "DeepseekV3ForCausalLM", _problems, lambda layout: _config(layout, DEEPSEEK_V3),
                     _tensors, mixer="mla", routed=None, mtp=True)
