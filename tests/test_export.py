"""Exporting to transformers (``zoo.export``): every family round-trips both ways.

transformers -> zoo -> transformers gives the original tensors back bit for bit (tiny random models of each
family, built as tests/test_import.py builds them) and a config transformers computes the same logits from;
zoo -> transformers gives zoo's float32 logits within 1e-4 (relative to the largest logit). Models no family
represents fail with an error naming the config key, block and option. Scaled ropes export to the
``rope_parameters`` they were imported from."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from test_import import FAMILIES, deepseek_with_mtp, hf_model  # noqa: E402
from test_rope_scaling import CASES as ROPE_CASES  # noqa: E402
from test_rope_scaling import ORIGINAL, hf_scaled  # noqa: E402

import zoo  # noqa: E402
from zoo.tokenizer import ByteTokenizer  # noqa: E402

# (preset, model.* overrides, expected family): zoo models whose every option some family represents.
ATTENTION = {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0}
QWEN3_ATTENTION = {**ATTENTION, "head_dim": 16, "qk_norm": True, "qk_norm_scope": "head", "qk_norm_eps": 1e-5}
SOFTMAX_MOE = {"type": "moe", "n_experts": 4, "top_k": 2, "d_hidden": 24, "score_func": "softmax"}
NATIVE = {
    "llama": dict(mixer={**ATTENTION, "rope_scaling": {"type": "dynamic", "factor": 2.0,
                                                       "original_max_position_embeddings": 16}},
                  ffn={"type": "mlp", "d_hidden": 48, "bias": True}),
    "qwen2": dict(mixer={**ATTENTION, "qkv_bias": True}, ffn={"type": "mlp", "d_hidden": 48}),
    "mixtral": dict(mixer=ATTENTION, ffn={**SOFTMAX_MOE, "aux_loss_weight": 0.01}, tie_embeddings=False),
    "olmoe": dict(mixer={**ATTENTION, "qk_norm": True, "qk_norm_eps": 1e-5}, norm={"type": "rmsnorm", "eps": 1e-5},
                  ffn={**SOFTMAX_MOE, "norm_topk_prob": False}),
    "qwen2_moe": dict(mixer={**ATTENTION, "qkv_bias": True}, layers={1: {"ffn": {"type": "mlp", "d_hidden": 40}}},
                      ffn={**SOFTMAX_MOE, "n_shared_experts": 1, "d_shared_hidden": 32, "shared_expert_gate": True}),
    "qwen3": dict(mixer={**QWEN3_ATTENTION, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 16}},
                  norm={"type": "rmsnorm", "eps": 1e-5}, ffn={"type": "mlp", "d_hidden": 48}),
    "qwen3_moe": dict(mixer=QWEN3_ATTENTION, norm={"type": "rmsnorm", "eps": 1e-5}, tie_embeddings=False,
                      layers={1: {"ffn": {"type": "mlp", "d_hidden": 40}}},
                      ffn={**SOFTMAX_MOE, "norm_topk_prob": True}),
    "deepseek_v3": dict(mixer={"type": "mla", "n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                               "qk_rope_head_dim": 4, "v_head_dim": 8},
                        ffn={"type": "moe", "n_experts": 8, "top_k": 2, "d_hidden": 16, "score_func": "sigmoid",
                             "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "n_shared_experts": 2,
                             "loss_free_bias": True, "seq_aux_loss_weight": 1e-4},
                        layers={0: {"ffn": {"type": "mlp", "d_hidden": 48}}}, mtp={"depth": 1}, tie_embeddings=False),
}


def zoo_model(family: str) -> zoo.ZooModel:
    torch.manual_seed(0)
    model = zoo.create_model("dense-tiny", vocab_size=96, d_model=32, n_layers=3, max_seq_len=64,
                             **NATIVE[family]).eval()
    with torch.no_grad():  # norms, biases and the balancing bias away from their init, so each is seen to arrive
        for name, tensor in model.state_dict().items():
            if "norm" in name or name.endswith((".bias", "expert_bias")):
                tensor.add_(torch.randn_like(tensor) * 0.2)
    return model


def assert_same_logits(expected: torch.Tensor, got: torch.Tensor) -> None:
    rel = (got - expected).abs().max() / expected.abs().max()
    assert got.dtype == torch.float32 and rel <= 1e-4, f"relative logit error {rel:.2e}"


QWEN_MOE_SETTINGS = ["num_experts", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers_to_zoo_to_transformers_gives_the_tensors_back(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    family = hf.config.model_type
    assert zoo.export(tmp_path / "hf", tmp_path / "out", family=family) == family
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original), [k for k in original
                                                                         if not torch.equal(original[k], exported[k])]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [type(hf).__name__]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    settings = ["rope_parameters", "rms_norm_eps", "num_key_value_heads", "intermediate_size"]
    settings += {"olmoe": ["num_experts", "norm_topk_prob"], "qwen2_moe": QWEN_MOE_SETTINGS,
                 "qwen3_moe": QWEN_MOE_SETTINGS}.get(family, [])
    for key in settings:  # the same settings (transformers maps num_experts to the key it holds)
        assert getattr(again.config, key) == getattr(hf.config, key), key
    ids = torch.randint(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert_same_logits(hf(ids).logits, again(ids).logits)


# Fields of zoo's scalings that are set by default to transformers' defaults (which a config may leave out).
TRANSFORMERS_ROPE_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_scaled_rope_round_trips_to_the_same_rope_parameters_and_logits(case, tmp_path):
    model_type, scaling, options = ROPE_CASES[case]
    hf = hf_scaled(model_type, scaling, options)
    hf.save_pretrained(tmp_path / "hf")
    assert zoo.export(tmp_path / "hf", tmp_path / "out", family=model_type) == model_type
    original, exported = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "out"))
    assert exported["max_position_embeddings"] == original["max_position_embeddings"]  # dynamic's original context
    rope, rope_back = original["rope_parameters"], exported["rope_parameters"]
    assert {k: rope_back[k] for k in rope} == rope
    assert {k: rope_back[k] for k in set(rope_back) - set(rope)} == {
        k: TRANSFORMERS_ROPE_DEFAULTS[k] for k in set(rope_back) - set(rope)}
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 3 * ORIGINAL))  # past the original context
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, again(ids).logits)


def test_the_family_is_chosen_automatically_and_mistral_on_request(tmp_path):
    hf = hf_model("mistral")
    hf.save_pretrained(tmp_path / "hf")
    assert zoo.export(tmp_path / "hf", tmp_path / "auto") == "llama"  # the same tensors; llama is tried first
    assert zoo.export(tmp_path / "hf", tmp_path / "mistral", family="mistral") == "mistral"
    assert json.loads((tmp_path / "mistral" / "config.json").read_text())["sliding_window"] is None


@pytest.mark.parametrize("family", list(NATIVE))
def test_zoo_models_export_to_their_family_with_zoo_logits(family, tmp_path):
    model = zoo_model(family)
    assert zoo.export(model, tmp_path) == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    ids = torch.randint(0, 96, (2, 40))  # past the scaled ropes' original context of 16
    with torch.no_grad():
        assert_same_logits(model(ids).logits, hf(ids).logits)
    back = zoo.from_pretrained(tmp_path)  # and home again: the same tensors (MTP layers included)
    expected = {k: v for k, v in model.state_dict().items() if not (model.config.tie_embeddings and k == "head.weight")}
    got = back.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in expected.items())


def test_deepseek_mtp_layers_round_trip(tmp_path):
    _, _, path = deepseek_with_mtp(tmp_path / "hf")
    assert zoo.export(path, tmp_path / "out") == "deepseek_v3"
    original, exported = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    experts = "model.layers.2.mlp.experts"  # the test's MTP layer holds them packed; exports write them per expert
    gate_up, down = original.pop(f"{experts}.gate_up_proj"), original.pop(f"{experts}.down_proj")
    for e in range(gate_up.shape[0]):
        assert torch.equal(torch.cat([exported.pop(f"{experts}.{e}.gate_proj.weight"),
                                      exported.pop(f"{experts}.{e}.up_proj.weight")]), gate_up[e])
        assert torch.equal(exported.pop(f"{experts}.{e}.down_proj.weight"), down[e])
    assert "model.layers.2.eh_proj.weight" in exported and sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


@pytest.mark.parametrize("preset, overrides, message", [
    ("retnet-tiny", {"n_layers": 1}, r"model.mixer: mixer 'retention' has no transformers family"),
    ("switch-tiny", {"n_layers": 1}, r"model.layers.0.ffn: ffn 'switch' \(top-1 with expert capacity, capacity_factor=1.25\)"),
    ("hybrid-tiny", {}, r"model.layers.2.mixer: mixer 'attention' differs from layer 0's 'retention'"),
    ("deepseek-moe-tiny", {"n_layers": 2}, r"mixtral cannot represent model.ffn \(moe\): score_func='sigmoid'.*"
                                           r"qwen2_moe cannot represent .*shared_expert_gate=False"),
    ("mtp-tiny", {"n_layers": 1}, r"llama cannot represent model.mtp"),
    ("dense-tiny", {"n_layers": 2, "layers": {1: {"ffn": {"d_hidden": 96}}}},
     r"model.layers.1.ffn: this dense 'mlp' FFN differs from an earlier layer's \(d_hidden=96\)"),
])
def test_models_no_family_represents_fail_clearly(preset, overrides, message, tmp_path):
    model = zoo.create_model(preset, d_model=64, **overrides)
    with pytest.raises(zoo.ConfigError, match=message + ".*format='zoo'"):
        zoo.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    assert zoo.export(model, tmp_path / "out", format="auto") == "zoo"
    assert zoo.from_pretrained(tmp_path / "out").config == model.config


def test_a_family_that_does_not_fit_names_the_option(tmp_path):
    with pytest.raises(zoo.ConfigError, match=r"qwen2 cannot represent model.mixer \(attention\): qkv_bias=False"):
        zoo.export(zoo_model("llama"), tmp_path, family="qwen2")


def test_a_run_directory_exports_its_final_checkpoint_and_tokenizer(tmp_path):
    model = zoo_model("llama")
    model.save_pretrained(tmp_path / "run" / "final", extra_files={"tokenizer.json": ByteTokenizer().to_json()})
    assert zoo.export(tmp_path / "run", tmp_path / "out") == "llama"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == ByteTokenizer.eot_id
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("hi").input_ids == [104, 105] and tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "onnx"}, "format='onnx'; choose one of transformers, zoo, auto"),
    ({"family": "gpt2"}, "family='gpt2'; choose one of llama"),
    ({"family": "llama", "format": "zoo"}, "is a transformers family"),
])
def test_bad_arguments_fail_clearly(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        zoo.export(zoo_model("llama"), tmp_path, **kwargs)
