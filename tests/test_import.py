"""Importing transformers checkpoints: tiny random models of every supported ``model_type``, built and
saved with transformers in the test, load through ``zoo.from_pretrained`` with float32 logits within
1e-4 (relative to the largest logit) of transformers', and greedy generation equal token for token."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import zoo  # noqa: E402
from zoo.blocks.auxiliary import AuxCollector  # noqa: E402
from zoo.checkpoint.importers import supported_model_types  # noqa: E402
from zoo.errors import CheckpointError  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "llama": {},
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    "mistral": dict(sliding_window=64),
    "qwen2": {},
    "qwen3": dict(head_dim=16),  # head_dim * heads != hidden_size, as in Qwen3's releases
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, norm_topk_prob=False, decoder_sparse_step=2),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                      decoder_sparse_step=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "deepseek_v3": dict(num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                        topk_group=2, n_shared_experts=1, moe_intermediate_size=16, q_lora_rank=16,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        routed_scaling_factor=2.5),
    "deepseek_v3-no-q-lora": dict(model_type="deepseek_v3", num_key_value_heads=4, first_k_dense_replace=2, n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=16, q_lora_rank=None,
                                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
}
# rms_norm_eps far from 1e-6 (0.3 puts the logits 0.74 relative off if it reaches the MLA latent norms, which
# transformers keeps at eps 1e-6 whatever rms_norm_eps says)
FAMILIES["deepseek_v3-rms-eps"] = dict(FAMILIES["deepseek_v3"], model_type="deepseek_v3", rms_norm_eps=0.3)


def hf_model(name: str, **extra):
    options = dict(FAMILIES[name], **extra)
    model_type = options.pop("model_type", name)
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **options})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # q/k norms away from 1, so that a swapped or misplaced one shows
        for param_name, param in model.named_parameters():
            if param_name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1.0, 0.2)
    if model_type == "deepseek_v3":  # a non-zero selection bias, so that "selection only" is tested
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.05)
    return model


def assert_parity(hf, path, new_tokens: int = 8):
    model = zoo.from_pretrained(path).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids).logits
    assert got.dtype == torch.float32
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-4, f"relative logit error {rel:.2e}"
    prompt = ids[:1, :5]
    with torch.no_grad():
        reference = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=new_tokens), reference)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_matches_transformers(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    model = assert_parity(hf, tmp_path)
    if name == "llama-tied":
        assert model.config.tie_embeddings and model.head.weight is model.embed.weight
    if name == "mistral":
        assert model.config.max_seq_len == 64  # full attention equals the window up to its length
    if name.startswith("deepseek_v3"):
        assert model.blocks[0].mixer.init_state(1, 10, "cpu", torch.float32).latent.shape == (1, 10, 16)
        assert model.blocks[0].mixer.kv_norm.eps == 1e-6  # the latent norms' eps, whatever rms_norm_eps says
        assert model.config.norm.options.eps == hf.config.rms_norm_eps


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_packed_expert_layout(name, tmp_path):
    """transformers 5 keeps experts packed (``experts.gate_up_proj``) in memory; checkpoints may hold that too."""
    hf = hf_model(name)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    assert_parity(hf, tmp_path, new_tokens=3)


def test_rope_theta_in_the_older_config_form(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500.0})).eval()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=500.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = assert_parity(hf, tmp_path, new_tokens=3)
    assert model.config.mixer.options.rope_theta == 500.0


def deepseek_with_mtp(tmp_path, perturb_head_copy: bool = False):
    """A tiny DeepSeek-V3 checkpoint in the released layout: the main layers, then one MTP layer at
    ``model.layers.{n_layers}`` (enorm, hnorm, eh_proj, a MoE decoder layer, shared_head, and copies of the
    embedding and head). Returns the transformers model, the MTP layer's modules, and the path."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    hf = hf_model("deepseek_v3")
    config, d = hf.config, hf.config.hidden_size
    torch.manual_seed(1)
    mtp = torch.nn.ModuleDict({"enorm": DeepseekV3RMSNorm(d, config.rms_norm_eps),
                               "hnorm": DeepseekV3RMSNorm(d, config.rms_norm_eps),
                               "eh_proj": torch.nn.Linear(2 * d, d, bias=False),
                               "layer": DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers),
                               "norm": DeepseekV3RMSNorm(d, config.rms_norm_eps)})
    for module in mtp.modules():
        hf._init_weights(module)
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if "norm" in name:  # norms away from 1, so that each is seen to be mapped to its place
                p.normal_(1.0, 0.2)
        mtp["layer"].mlp.gate.e_score_correction_bias.normal_(std=0.05)
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    prefix = f"model.layers.{config.num_hidden_layers}"
    for name, tensor in mtp["layer"].state_dict().items():
        weights[f"{prefix}.{name}"] = tensor.contiguous()
    for name in ("enorm", "hnorm", "eh_proj"):
        weights[f"{prefix}.{name}.weight"] = mtp[name].weight.detach().clone()
    weights[f"{prefix}.shared_head.norm.weight"] = mtp["norm"].weight.detach().clone()
    weights[f"{prefix}.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    weights[f"{prefix}.shared_head.head.weight"] = weights["lm_head.weight"].clone() + (1e-3 if perturb_head_copy else 0)
    save_file(weights, tmp_path / "model.safetensors")
    return hf, mtp, tmp_path


def reference_mtp_logits(hf, mtp, ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's MTP depth 1 computed with transformers' own layers: position i reads the main model's
    last hidden state (before its final norm) and the embedding of token i+1, and predicts token i+2."""
    captured = {}
    hook = hf.model.layers[-1].register_forward_hook(lambda module, args, out: captured.update(h=out))
    hf(ids)
    hook.remove()
    h, T = captured["h"][:, :-1], ids.shape[1] - 1
    x = mtp["eh_proj"](torch.cat([mtp["enorm"](hf.model.embed_tokens(ids[:, 1:])), mtp["hnorm"](h)], dim=-1))
    position_ids = torch.arange(T)[None]
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    x = mtp["layer"](x, attention_mask=causal, position_ids=position_ids,
                     position_embeddings=hf.model.rotary_emb(x, position_ids))
    return hf.lm_head(mtp["norm"](x))


def test_deepseek_mtp_layer_is_imported(tmp_path):
    hf, mtp, path = deepseek_with_mtp(tmp_path)
    model = assert_parity(hf, path, new_tokens=3)  # the main model is unchanged by the MTP layer beside it
    assert model.config.mtp.depth == 1 and model.config.mtp.heads == "sequential"
    ids = torch.randint(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = reference_mtp_logits(hf, mtp, ids)
        h = model.hidden_states(ids, AuxCollector())
        got = model.head(model.mtp.layers[0].norm(model.mtp.step(1, h[:, :-1], ids[:, 1:], model.embed, AuxCollector())))
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-4, f"relative MTP logit error {rel:.2e}"
    prompt = ids[:1, :5]
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=8)
        speculative, stats = model.generate(prompt, max_new_tokens=8, speculative="mtp", return_stats=True)
    assert torch.equal(speculative, plain) and stats["drafted"] > 0
    assert zoo.from_pretrained(path, drop_mtp=True).mtp is None


def test_deepseek_mtp_layer_with_its_own_head_is_skipped_with_a_message(tmp_path):
    hf, _, path = deepseek_with_mtp(tmp_path, perturb_head_copy=True)
    with pytest.warns(UserWarning, match="skipping the DeepSeek-V3 multi-token-prediction layers.*shared_head.head"):
        model = assert_parity(hf, path, new_tokens=2)
    assert model.mtp is None


def test_deepseek_mtp_layers_must_match_num_nextn_predict_layers(tmp_path):
    hf, _, path = deepseek_with_mtp(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 2}))
    with pytest.raises(CheckpointError, match=r"model.layers.\[2\] do not match num_nextn_predict_layers=2"):
        zoo.from_pretrained(path)


def test_unknown_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'gpt2' cannot be imported; supported: " + ", ".join(supported_model_types())):
        zoo.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}},
     "rope_type='longrope'.*supported: 'default', 'dynamic', 'linear', 'llama3', 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'.*supported: 'silu'"),
    ({"attention_bias": True}, "attention_bias=True.*supported: False"),
])
def test_unsupported_options_fail_clearly(tmp_path, change, message):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        zoo.from_pretrained(tmp_path)


def test_leftover_tensors_are_named(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not map: \['model.layers.0.self_attn.mystery.weight'\]"):
        zoo.from_pretrained(tmp_path)


# ------------------------------------------------------------------ fp8 checkpoints (DeepSeek-V3's release format)

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def quantise_like_deepseek(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w (N, K)`` as DeepSeek-V3's checkpoints store it: float8_e4m3fn ``q`` and float32 ``scale_inv`` =
    amax / 448 per 128x128 block (edge blocks partial), computed in float64; also ``q * scale_inv`` in float64."""
    N, K = w.shape
    nb, kb = -(-N // 128), -(-K // 128)
    padded = torch.zeros(nb * 128, kb * 128, dtype=torch.float64)
    padded[:N, :K] = w.double()
    blocks = padded.view(nb, 128, kb, 128)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448).float()
    q = (blocks / scale.double()[:, None, :, None]).view(nb * 128, kb * 128)[:N, :K].to(torch.float8_e4m3fn)
    full_scale = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
    return q, scale, q.double() * full_scale


def deepseek_fp8(tmp_path):
    """A tiny DeepSeek-V3 saved by transformers, its decoder-layer linears quantised as the released checkpoints
    are (routers, norms, embedding and head stay in float32), next to the same model holding the dequantised
    weights (float64 products rounded once to float32). intermediate_size 160 gives partial edge blocks."""
    hf = hf_model("deepseek_v3", intermediate_size=160)
    hf.save_pretrained(tmp_path / "fp8")
    weights = load_file(tmp_path / "fp8" / "model.safetensors")
    quantised, dequantised = dict(weights), dict(weights)
    for name, w in weights.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            q, scale, exact = quantise_like_deepseek(w)
            quantised[name], quantised[name.replace(".weight", ".weight_scale_inv")] = q, scale
            dequantised[name] = exact.float()
    assert sum(q.dtype == torch.float8_e4m3fn for q in quantised.values()) > 20
    assert quantised["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    save_file(quantised, tmp_path / "fp8" / "model.safetensors")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    (tmp_path / "fp8" / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG}))
    hf.save_pretrained(tmp_path / "reference")
    save_file(dequantised, tmp_path / "reference" / "model.safetensors")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference", attn_implementation="eager")
    return reference.eval(), tmp_path / "fp8"


def test_deepseek_fp8_checkpoint_is_dequantised(tmp_path):
    reference, path = deepseek_fp8(tmp_path)
    model = assert_parity(reference, path, new_tokens=3)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dequantised_weights_requantise_to_the_checkpoint_fp8_values():
    """What ``model.fp8: {recipe: blockwise}`` does to an imported fp8 weight: its 128x128 weight blocks
    (amax floor 1e-4, scale amax / 448) give back the checkpoint's e4m3 values and scales bit for bit."""
    from zoo.checkpoint.importers.quantized import dequantize_fp8
    from zoo.fp8.quant import BLOCK, E4M3, quantize

    torch.manual_seed(0)
    w = torch.randn(300, 260) * 0.05
    q, scale, _ = quantise_like_deepseek(w)
    state = dequantize_fp8({"quantization_config": FP8_CONFIG}, {"x.weight": q, "x.weight_scale_inv": scale}, "t")
    assert list(state) == ["x.weight"] and state["x.weight"].dtype == torch.float32
    q2, scale2 = quantize(state["x.weight"], E4M3, BLOCK, amax_floor=1e-4)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale2, scale)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "bitsandbytes"}, r"quantization_config.quant_method='bitsandbytes'.*supported: 'fp8'"),
    ({"fmt": "e5m2"}, r"quantization_config.fmt='e5m2'.*supported: 'e4m3'"),
    ({"activation_scheme": "static"}, r"quantization_config.activation_scheme='static'.*supported: 'dynamic'"),
    ({"weight_block_size": [128]}, r"weight_block_size=\[128\].*supported: two positive integers"),
    ({"weight_block_size": [64, 64]}, r"mlp.\w+_proj.weight: weight_scale_inv has shape \(\d, \d\); a \(\d+, \d+\) "
                                      r"weight in \[64, 64\] blocks needs \((3, 1|1, 3)\)"),
])
def test_unsupported_fp8_settings_fail_clearly(tmp_path, change, message):
    _, path = deepseek_fp8(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        zoo.from_pretrained(path)
