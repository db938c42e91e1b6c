"""Export to the Mixture-of-Experts Llama families: ``mixtral``, ``olmoe``, ``qwen2_moe``, ``qwen3_moe``; the
inverse of :mod:`zoo.checkpoint.importers.sparse`.

Each represents zoo's ``moe`` FFN with its own fixed routing rule, so the family follows from the options:
softmax scores over all experts in every family; Mixtral always renormalises the top-k and has no shared
expert; OLMoE normalises the q and k projections (zoo's ``qk_norm``, with the model's norm eps) and
renormalises only with ``norm_topk_prob``; Qwen2-MoE adds one shared SwiGLU scaled by ``sigmoid(Linear(d ->
1))`` (``shared_expert_gate``) and may bias q, k, v; Qwen3-MoE has no shared expert and normalises each head
of q and k (``qk_norm_scope: head``). Both Qwens keep dense SwiGLU layers of width ``intermediate_size``
anywhere, written as ``decoder_sparse_step`` and ``mlp_only_layers`` (:func:`sparse_layers`). None has
group-limited routing, a routed scaling factor or a selection bias. Experts are written per expert, as
transformers' ``save_pretrained`` writes them.
"""

from __future__ import annotations

from zoo.interop import mapping
from zoo.interop.layout import (Family, Layout, attention_config, attention_problems, base_config, mlp_problems,
                                option_problems, require)
from zoo.interop.mapping import ZooTensors

_HANDLED = {"n_experts", "top_k", "d_hidden", "score_func", "norm_topk_prob", "routed_scaling_factor", "n_group",
            "topk_group", "n_shared_experts", "d_shared_hidden", "shared_expert_gate", "loss_free_bias"}
_QWENS = ("qwen2_moe", "qwen3_moe")  # dense layers anywhere


def _moe_problems(layout: Layout, family: str) -> list[str]:
    if layout.moe is None:
        return ["model.ffn: no routed experts (a dense model exports as llama, qwen2 or qwen3)"]
    where, moe = layout.describe("moe"), layout.moe.options
    problems = option_problems(layout.moe, _HANDLED, where)
    for ok, option in ((moe.score_func == "softmax", "score_func"), (moe.routed_scaling_factor == 1.0, "routed_scaling_factor"),
                       (moe.n_group == 1, "n_group"), (not moe.loss_free_bias, "loss_free_bias"),
                       (family != "mixtral" or moe.norm_topk_prob, "norm_topk_prob"),
                       ((moe.n_shared_experts > 0) == (family == "qwen2_moe"), "n_shared_experts"),
                       (moe.shared_expert_gate == (family == "qwen2_moe"), "shared_expert_gate")):
        require(problems, ok, f"{where}: {option}={getattr(moe, option)!r}")
    return problems


def _problems(family: str):
    qk_norm = {"olmoe": "projection", "qwen3_moe": "head"}.get(family)
    qkv_bias = None if family == "qwen2_moe" else False

    def problems(layout: Layout) -> list[str]:
        found = attention_problems(layout, qkv_bias, qk_norm) + _moe_problems(layout, family)
        if family in _QWENS:
            return found + mlp_problems(layout, bias=False)
        if layout.mlp is not None:
            found.append(f"{layout.describe('mlp')}: dense layers {layout.dense_layers} ({family} routes every layer)")
        return found
    return problems


def sparse_layers(n_layers: int, dense_layers: list[int]) -> dict:
    """The Qwen MoEs' ``decoder_sparse_step`` and ``mlp_only_layers`` of a model whose ``dense_layers`` are
    dense (transformers routes layer ``i`` iff ``(i + 1) % step == 0`` and ``i`` is not in ``mlp_only_layers``):
    the step that leaves the fewest layers to list (the smallest such step on ties), so an imported model's
    own step comes back."""
    dense = set(dense_layers)

    def listed(step: int) -> list[int] | None:  # None: the step makes a routed layer dense
        by_step = {i for i in range(n_layers) if (i + 1) % step}
        return sorted(dense - by_step) if by_step <= dense else None

    step = min((s for s in range(1, n_layers + 1) if listed(s) is not None), key=lambda s: (len(listed(s)), s))
    return {"decoder_sparse_step": step, "mlp_only_layers": listed(step)}


def _config(layout: Layout, family: Family) -> dict:
    moe = layout.moe.options
    d_expert = moe.hidden_size(layout.d_model)
    config = {**base_config(layout, family), **attention_config(layout), "num_experts_per_tok": moe.top_k,
              "output_router_logits": False}
    if family.name == "mixtral":
        config.update(num_local_experts=moe.n_experts, intermediate_size=d_expert, sliding_window=None)
        return config
    config.update(num_experts=moe.n_experts, norm_topk_prob=moe.norm_topk_prob)
    if family.name == "olmoe":
        config.update(intermediate_size=d_expert, clip_qkv=None)
        return config
    # the Qwens; num_experts is the released configs' key, which transformers 5 maps to num_local_experts
    dense = layout.mlp.options.hidden_size(layout.d_model) if layout.mlp is not None else None
    config.update(moe_intermediate_size=d_expert, use_sliding_window=False, sliding_window=None,
                  **sparse_layers(layout.config.n_layers, layout.dense_layers))
    if family.name == "qwen2_moe":
        d_shared = moe.d_shared_hidden or moe.n_shared_experts * d_expert
        config.update(shared_expert_intermediate_size=d_shared, qkv_bias=layout.mixer.options.qkv_bias,
                      intermediate_size=dense or d_shared, max_window_layers=layout.config.n_layers)
        del config["attention_bias"]
    else:
        config.update(intermediate_size=dense or d_expert)
    return config


def _tensors(family: str):
    def tensors(layout: Layout, t: ZooTensors) -> None:
        config = layout.config
        for i in mapping.attention_layers(t, layout.mixer.options, layout.d_model, config.n_layers,
                                          config.tie_embeddings):
            src, dst = f"blocks.{i}.ffn", f"model.layers.{i}.mlp"
            if i in layout.dense_layers:
                mapping.swiglu(t, src, dst)
                continue
            if family == "mixtral":  # the names transformers' save_pretrained writes for Mixtral
                dst = f"model.layers.{i}.block_sparse_moe"
                mapping.experts(t, f"{src}.experts", f"{dst}.experts", ("w1", "w3", "w2"))
            else:
                mapping.experts(t, f"{src}.experts", f"{dst}.experts", ("gate_proj", "up_proj", "down_proj"))
            t.move(f"{src}.router.weight", f"{dst}.gate.weight")
            if family == "qwen2_moe":
                mapping.swiglu(t, f"{src}.shared", f"{dst}.shared_expert")
                t.move(f"{src}.shared_gate.weight", f"{dst}.shared_expert_gate.weight")
    return tensors


def _family(name: str, architecture: str) -> Family:
    family = Family(name, architecture, _problems(name), lambda layout: _config(layout, family), _tensors(name),
                    routed=True)
    return family


MIXTRAL = _family("mixtral", "MixtralForCausalLM")
OLMOE = _family("olmoe", "OlmoeForCausalLM")
QWEN2_MOE = _family("qwen2_moe", "Qwen2MoeForCausalLM")
QWEN3_MOE = _family("qwen3_moe", "Qwen3MoeForCausalLM")
