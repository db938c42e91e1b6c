"""Prompt tuning (Lester et al. 2021, §2) and prefix tuning (Li & Liang 2021, §4.2) on a model mixing GQA attention,
retention and MLA: causality, decoding against the full forward, the adapter switched off, gradients, checkpoints,
the reparameterisation, and float64 references for the attention prefix and RetNet's initial-state form."""

import math

import pytest
import torch

import zoo
from zoo.adapters import (InitialStateRetention, PrefixAttention, PrefixMLA, PromptEmbeddings, adapter_disabled,
                          adapter_modules, adapter_state_dict, fold_reparam)
from zoo.adapters.prefix import prefix_initial_state
from zoo.blocks.retention_ops import chunkwise_retention, naive_retention, parallel_retention, recurrent_retention
from zoo.errors import ConfigError
from zoo.train.config import OptimizerConfig
from zoo.train.module import make_optimizer

MLA = {"type": "mla", "n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
MIXED = dict(d_model=32, n_layers=3, max_seq_len=64, mixer={"n_heads": 4, "n_kv_heads": 2}, ffn={"d_hidden": 48},
             layers={1: {"mixer": {"type": "retention", "n_heads": 4}}, 2: {"mixer": MLA}})
ADAPTERS = {
    "prefix": {"type": "prefix_tuning", "n_tokens": 3},
    "prefix-reparam": {"type": "prefix_tuning", "n_tokens": 3, "reparam": True, "reparam_hidden": 16},
    "prompt": {"type": "prompt_tuning", "n_tokens": 4},
}


def mixed(adapter=None, dtype=torch.float64) -> zoo.ZooModel:
    torch.manual_seed(0)
    model = zoo.create_model("dense-tiny", **MIXED).to(dtype).eval()
    if adapter is not None:
        torch.manual_seed(1)
        zoo.add_adapter(model, adapter)
    return model


def ids(seed: int = 2, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base():
    return mixed()


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapted_models_are_causal_decode_as_the_full_forward_and_switch_off_to_the_base(name, base):
    model, x = mixed(ADAPTERS[name]), ids()
    logits = model(x).logits
    assert logits.shape == (2, 10, 257)  # virtual positions dropped: aligned with the input
    assert (logits - base(x).logits).abs().max() > 1e-3
    with adapter_disabled(model):
        assert torch.equal(model(x).logits, base(x).logits)
    changed = x.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 257
    assert torch.equal(model(changed).logits[:, :6], logits[:, :6])  # causal
    assert (model(changed).logits[:, 6:] - logits[:, 6:]).abs().max() > 1e-6
    states = model.init_states(2, 10)
    steps = [model(x[:, :5], states=states).logits] + [model(x[:, t:t + 1], states=states).logits for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), logits, rtol=0, atol=1e-8)
    greedy = x[:, :4]
    for _ in range(6):  # greedy decoding by full forwards, no decoding state
        greedy = torch.cat((greedy, model(greedy).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(model.generate(x[:, :4], max_new_tokens=6), greedy)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_only_adapter_parameters_get_gradients(name):
    model = mixed(ADAPTERS[name], dtype=torch.float32).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    assert model.num_parameters(trainable=True) < 0.1 * model.num_parameters()
    x = ids()
    model(x, labels=x).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    optimized = {id(p) for group in make_optimizer(model, OptimizerConfig()).param_groups for p in group["params"]}
    assert optimized == {id(model.get_parameter(n)) for n in trainable}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_checkpoints_reload_to_identical_logits(name, base, tmp_path):
    base.save_pretrained(tmp_path / "base")
    model = zoo.from_pretrained(tmp_path / "base")
    zoo.add_adapter(model, ADAPTERS[name], base=str(tmp_path / "base"))
    model.save_pretrained(tmp_path / "adapter")
    again = zoo.from_pretrained(tmp_path / "adapter")
    x = ids()
    assert torch.equal(again(x).logits, model(x).logits)
    model.adapter_base = None  # no known base: a full checkpoint whose config keeps model.adapter
    model.save_pretrained(tmp_path / "full")
    assert torch.equal(zoo.from_pretrained(tmp_path / "full")(x).logits, model(x).logits)


def test_adapter_modules_and_initialisation_from_the_vocabulary(base):
    model = mixed(ADAPTERS["prefix"])
    assert [type(m) for _, m in adapter_modules(model)] == [PrefixAttention, InitialStateRetention, PrefixMLA]
    attention = model.blocks[0].mixer
    assert attention.prefix_key.shape == (2, 3, 8)  # (n_kv_heads, n_tokens, head_dim): one prefix per K/V head
    assert model.blocks[1].mixer.prefix_state.shape == (4, 8, 16)  # (H, Dk, Dv)
    assert model.blocks[2].mixer.prefix_latent.shape == (3, 16) and model.blocks[2].mixer.prefix_rope_key.shape == (3, 4)
    # init: text sets the prefixes to the base's own cache and state after reading those tokens (Li & Liang §7.2).
    text = [10, 20, 30]
    model = mixed({"type": "prefix_tuning", "n_tokens": 3, "init": "text", "init_ids": text})
    states = base.init_states(1, 3)
    base(torch.tensor([text]), states=states)
    assert torch.equal(model.blocks[0].mixer.prefix_value, states[0].v[0])
    assert torch.equal(model.blocks[1].mixer.prefix_state, states[1].recurrent[0])
    assert torch.equal(model.blocks[2].mixer.prefix_latent, states[2].latent[0])
    prompt = mixed({"type": "prompt_tuning", "n_tokens": 5, "init": "text", "init_ids": text}).prompt
    assert isinstance(prompt, PromptEmbeddings)
    assert torch.equal(prompt.prompt_embeddings, base.embed.weight[[10, 20, 30, 10, 20]])  # repeated to n_tokens
    uniform = mixed({"type": "prompt_tuning", "n_tokens": 50, "init": "random"}).prompt.prompt_embeddings
    assert uniform.abs().max() <= 0.5 and uniform.std() > 0.2  # U(-0.5, 0.5), Lester et al.'s random init


def test_prompt_tuning_is_the_model_on_prepended_embeddings(base):
    model, x = mixed(ADAPTERS["prompt"]), ids()
    h = torch.cat((model.prompt.prompt_embeddings.expand(2, -1, -1), base.embed(x)), dim=1)
    for block in base.blocks:
        h = block(h, zoo.model.decoder.AuxCollector())
    torch.testing.assert_close(model(x).logits, base.head(base.norm(h))[:, 4:], rtol=0, atol=1e-12)


def test_attention_prefix_equals_a_float64_reference():
    """Softmax attention over [prefix keys (post-RoPE, per K/V head); real keys rotated at positions n..n+T-1]."""
    model, x = mixed(ADAPTERS["prefix"]), ids(length=6)
    mixer = model.blocks[0].mixer
    h = model.blocks[0].mixer_norm(model.embed(x))
    q, k, v = mixer.qkv(h).split([4 * 8, 2 * 8, 2 * 8], dim=-1)
    n, T = 3, 6
    angles = torch.arange(n, n + T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8)

    def rotate(t):  # (B, T, heads, 8), the half layout
        t1, t2 = t.unflatten(-1, (2, 4)).unbind(-2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1)

    q, k = rotate(q.view(2, T, 4, 8)), rotate(k.view(2, T, 2, 8))
    keys = torch.cat((mixer.prefix_key.transpose(0, 1).expand(2, -1, -1, -1), k), dim=1).repeat_interleave(2, dim=2)
    values = torch.cat((mixer.prefix_value.transpose(0, 1).expand(2, -1, -1, -1), v.view(2, T, 2, 8)), dim=1)
    values = values.repeat_interleave(2, dim=2)  # (B, n + T, H, 8): query heads 2g, 2g+1 share K/V head g
    scores = torch.einsum("bthd,bshd->bhts", q, keys) / math.sqrt(8)
    visible = torch.arange(n + T)[None, :] <= torch.arange(n, n + T)[:, None]  # every prefix, real keys causally
    out = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~visible, float("-inf")).softmax(-1), values)
    torch.testing.assert_close(mixer(h), mixer.out(out.reshape(2, T, 32)), rtol=0, atol=1e-12)


def test_retention_initial_state_forms_agree_and_equal_a_prefix_of_tokens():
    """From S_0, the recurrent, parallel (one chunk) and chunkwise forms equal the definition; and S_0 built from
    n prefix tokens by the decayed sum is retention over [prefix; x] with the prefix outputs dropped (float64)."""
    g = torch.Generator().manual_seed(0)
    B, H, T, Dk, Dv, n = 2, 3, 11, 4, 5, 6
    q, k = (torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    log_gamma = torch.log1p(-torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6], dtype=torch.float64))
    pk, pv = torch.randn(n, H, Dk, generator=g, dtype=torch.float64), torch.randn(n, H, Dv, generator=g, dtype=torch.float64)
    S0 = prefix_initial_state(pk, pv, log_gamma).expand(B, -1, -1, -1)
    expected, final = naive_retention(q, k, v, log_gamma, S0)
    for form in (recurrent_retention(q, k, v, log_gamma, S0), chunkwise_retention(q, k, v, log_gamma, T, S0),
                 chunkwise_retention(q, k, v, log_gamma, 4, S0)):
        torch.testing.assert_close(form[0], expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(form[1], final, rtol=0, atol=1e-12)
    prefixed = [torch.cat((p.permute(1, 0, 2).expand(B, -1, -1, -1), t), dim=2) for p, t in ((pk, k), (pv, v))]
    q_all = torch.cat((torch.randn(B, H, n, Dk, generator=g, dtype=torch.float64), q), dim=2)
    torch.testing.assert_close(parallel_retention(q_all, *prefixed, log_gamma)[:, :, n:], expected, rtol=0, atol=1e-12)


def test_the_retention_layer_starts_from_its_learned_state():
    model, x = mixed(ADAPTERS["prefix"]), ids()
    mixer = model.blocks[1].mixer
    with torch.no_grad():
        mixer.prefix_state.normal_()
    h = torch.randn(2, 10, 32, dtype=torch.float64)
    with adapter_disabled(model):
        state = mixer.init_state(2, 10, h.device, h.dtype)
        state.recurrent = mixer.prefix_state.expand(2, -1, -1, -1)
        reference = mixer(h, state)
    torch.testing.assert_close(mixer(h), reference, rtol=0, atol=1e-12)


def test_fold_reparam_keeps_the_logits_and_saves_plain_prefixes(tmp_path):
    model, x = mixed(ADAPTERS["prefix-reparam"]), ids()
    before = model(x).logits
    assert {n.split(".")[0] for n in adapter_state_dict(model)} == {"prefix_encoder"}
    fold_reparam(model)
    assert model.config.adapter.options.reparam is False and not hasattr(model, "prefix_encoder")
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-12)
    assert sorted(adapter_state_dict(model)) == ["blocks.0.mixer.prefix_key", "blocks.0.mixer.prefix_value",
                                                 "blocks.1.mixer.prefix_state", "blocks.2.mixer.prefix_latent",
                                                 "blocks.2.mixer.prefix_rope_key"]
    model.save_pretrained(tmp_path / "folded")
    torch.testing.assert_close(zoo.from_pretrained(tmp_path / "folded")(x).logits, before, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="reparam: true"):
        fold_reparam(model)


@pytest.mark.parametrize("spec, message", [
    ({"type": "prefix_tuning", "n_tokens": 0}, "model.adapter: n_tokens must be positive"),
    ({"type": "prompt_tuning", "init": "text"}, "init_ids"),
    ({"type": "prompt_tuning", "init": "words"}, "model.adapter.init: 'words'"),
    ({"type": "prefix_tuning", "init_ids": [1]}, "only read with init: text"),
])
def test_bad_options_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        zoo.add_adapter(zoo.create_model("dense-tiny", d_model=32, n_layers=1, mixer={"n_heads": 4}), spec)


def test_init_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ConfigError, match="init_ids: 300"):
        mixed({"type": "prompt_tuning", "init": "text", "init_ids": [300]})
