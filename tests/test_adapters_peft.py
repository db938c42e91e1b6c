"""peft interop: a LoRA (and DoRA) adapter saved by the ``peft`` library for a transformers Llama loads onto the
zoo model imported from that Llama through ``zoo.from_pretrained(adapter_dir)``, with transformers + peft's
logits (float32, within 1e-5 of the largest logit)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import zoo  # noqa: E402
from zoo.adapters import adapter_disabled, has_adapter  # noqa: E402

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


@pytest.mark.parametrize("targets, dora", [
    (["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], False),  # k and up of the fused modules left alone
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
])
def test_a_peft_adapter_loads_onto_the_imported_model(llama_dir, tmp_path, targets, dora):
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=dora, init_lora_weights=False)
    adapted = peft.get_peft_model(hf, config).eval()
    if dora:  # magnitudes away from their initial row norms, so that a wrong norm axis shows
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_magnitude" in name:
                    p.mul_(1 + 0.3 * torch.rand_like(p))
    adapted.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(llama_dir)
    model = zoo.from_pretrained(tmp_path / "adapter").eval()
    assert has_adapter(model) and model.config.adapter.options.dora == dora
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = adapted(ids).logits
        with adapted.disable_adapter():
            expected_base = adapted(ids).logits
        logits = model(ids).logits
        with adapter_disabled(model):
            base = model(ids).logits
    scale = expected.abs().max()
    assert (expected - expected_base).abs().max() > 1e-2 * scale  # the adapter matters
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(base, expected_base, rtol=0, atol=1e-5 * scale)
    merged = model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5 * scale)


def test_unsupported_peft_options_are_named(llama_dir, tmp_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(zoo.CheckpointError, match=r"use_rslora=True is not supported"):
        zoo.from_pretrained(tmp_path / "adapter")
