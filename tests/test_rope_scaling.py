"""Rope scalings (``linear``, ``dynamic``, ``llama3``, ``yarn``): tiny random transformers models of the imported
families with each scaling, imported by zoo, give float32 logits within 1e-4 (relative to the largest logit) of
transformers' over 48 positions, three times the original context of 16, and the same greedy tokens when
generation runs past it; bad scaling configs fail at load with the key named."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zoo  # noqa: E402
from zoo.errors import CheckpointError, ConfigError  # noqa: E402

ORIGINAL = 16  # the context the rope was "trained" for; the tests run to 3x that
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# rope_theta 100 with head_dim 16 puts the wavelengths (6 to 1100 positions) on both sides of the original context,
# so llama3 keeps, interpolates and scales some dimensions each, and yarn's ramp has kept, blended and scaled ones.
SCALINGS = {
    "linear": dict(rope_type="linear", factor=3.0),
    "dynamic": dict(rope_type="dynamic", factor=2.5),
    "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=2 * ORIGINAL),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, beta_fast=8.0, beta_slow=0.5),
    "yarn-attention-factor": dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=ORIGINAL,
                                  attention_factor=1.3),
}
DEEPSEEK = dict(num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                topk_group=1,
                n_shared_experts=1, moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=16, v_head_dim=8, hidden_size=32)
CASES = {
    "llama-linear": ("llama", "linear", {}),
    "llama-dynamic": ("llama", "dynamic", {}),
    "llama-llama3": ("llama", "llama3", {}),
    "qwen2-yarn": ("qwen2", "yarn", {}),
    "mistral-yarn-attention-factor": ("mistral", "yarn-attention-factor", {}),
    "qwen3-llama3": ("qwen3", "llama3", dict(head_dim=16)),
    # head_dim set: transformers' dynamic rope reads a head_dim of None from a Mixtral config as is
    "mixtral-dynamic": ("mixtral", "dynamic", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
    "olmoe-linear": ("olmoe", "linear", dict(num_experts=4, num_experts_per_tok=2)),
    # DeepSeek-V3's own form: yarn with mscale and mscale_all_dim (unequal here, so that neither can stand in
    # for the other) on the MLA rope dims; mscale_all_dim also scales the MLA softmax.
    "deepseek_v3-yarn": ("deepseek_v3", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL,
                                             mscale=0.707, mscale_all_dim=1.3), DEEPSEEK),
}


def hf_scaled(model_type: str, scaling, options: dict):
    rope = dict(SCALINGS[scaling] if isinstance(scaling, str) else scaling, rope_theta=100.0)
    # dynamic scaling starts past max_position_embeddings; the others declare the original context themselves.
    max_positions = ORIGINAL if rope["rope_type"] == "dynamic" else 4 * ORIGINAL
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **options}, rope_parameters=rope,
                                               max_position_embeddings=max_positions)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("case", list(CASES))
def test_scaled_rope_matches_transformers_past_the_original_context(case, tmp_path):
    model_type, scaling, options = CASES[case]
    hf = hf_scaled(model_type, scaling, options)
    hf.save_pretrained(tmp_path)
    model = zoo.from_pretrained(tmp_path).eval()
    spec = model.config.mixer.options.rope_scaling
    assert spec.type == hf.config.rope_parameters["rope_type"]
    ids = torch.randint(0, hf.config.vocab_size, (2, 3 * ORIGINAL))
    prompt = ids[:1, :ORIGINAL - 6]
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids).logits
        tokens = model.generate(prompt, max_new_tokens=12)  # to position 22
        if model_type == "deepseek_v3":
            # transformers' cached DeepSeek-V3 generation departs from its own full forward under any rope
            # scaling (linear too; not with the unscaled rope): check each token against the full forward.
            reference = torch.cat([prompt, hf(tokens).logits[:, prompt.shape[1] - 1:-1].argmax(-1)], dim=1)
        else:
            reference = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-4, f"relative logit error {rel:.2e}"
    assert torch.equal(tokens, reference)


def test_scaling_changes_the_logits_past_the_original_context(tmp_path):
    """Guards the parity test: a model imported without its scaling is far off past the original context."""
    hf = hf_scaled("llama", "yarn", {})
    hf.save_pretrained(tmp_path)
    model = zoo.from_pretrained(tmp_path).eval()
    plain = zoo.build_model(model.config.with_overrides({"model.mixer.rope_scaling": None})).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, hf.config.vocab_size, (1, 3 * ORIGINAL))
    with torch.no_grad():
        expected, got = hf(ids).logits, plain(ids).logits
    assert (got - expected).abs().max() / expected.abs().max() > 1e-2


@pytest.mark.parametrize("scaling", ["linear", "llama3", "yarn"])
def test_cached_decoding_equals_a_full_forward(scaling):
    """Length-independent scalings: the KV-cache path rotates every position as the full forward does."""
    options = {k: v for k, v in SCALINGS[scaling].items() if k != "rope_type"}
    model = zoo.build_model(zoo.load_config("dense-tiny").model.with_overrides({
        "model.max_seq_len": 64, "model.mixer.rope_scaling": {"type": scaling, **options}})).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        states = model.init_states(1, 40)
        steps = [model(ids[:, :20], states=states).logits] + [model(ids[:, t:t + 1], states=states).logits
                                                              for t in range(20, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaling, message", [
    ({"type": "yarn", "factor": 4.0}, "rope_scaling.original_max_position_embeddings is required by rope scaling "
                                      "type 'yarn'"),
    ({"type": "lama3"}, "unknown rope_scaling 'lama3' \\(did you mean llama3\\?\\); registered rope_scalings: "
                        "dynamic, linear, llama3, yarn"),
    ({"type": "linear", "factr": 2.0}, "unknown key 'model.mixer.rope_scaling.factr'; did you mean factor"),
    ({"type": "linear", "factor": -2.0}, "rope_scaling.factor must be positive"),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, "high_freq_factor=1.0 must exceed low_freq_factor=4.0"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 1.0, "beta_slow": 2.0},
     "beta_fast=1.0 must exceed beta_slow=2.0"),
])
def test_bad_scaling_configs_name_the_key(scaling, message):
    with pytest.raises(ConfigError, match=message):
        zoo.load_config("dense-tiny").model.with_overrides({"model.mixer.rope_scaling": scaling})


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5.*supported: 1.0"),
    ({"full_attention": {"rope_type": "default"}}, "rope_parameters=.*'full_attention'.*not nested per layer"),
])
def test_unsupported_rope_options_fail_clearly(rope, message, tmp_path):
    import json

    hf = hf_scaled("llama", "linear", {})
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 100.0, **rope}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        zoo.from_pretrained(tmp_path)


def test_older_rope_scaling_key_with_type_is_read(tmp_path):
    """Configs written before transformers 5 (Llama 3.1's, DeepSeek-V3's) hold ``rope_scaling`` (``type`` or
    ``rope_type``) and a top-level ``rope_theta``."""
    import json

    hf = hf_scaled("llama", "llama3", {})
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling={**rope, "type": rope.pop("rope_type")})
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = zoo.from_pretrained(tmp_path)
    options = model.config.mixer.options
    assert options.rope_theta == 100.0 and options.rope_scaling.type == "llama3"
    assert options.rope_scaling.options.original_max_position_embeddings == 2 * ORIGINAL
