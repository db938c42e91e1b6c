"""Every registered mixer and every preset: causal, finite forward/backward, greedy decode == argmax.

Parametrized over the registry and ``zoo_configs/`` so a new block or preset is tested the moment it
exists. GPU-scale presets run at their width with their depth cut to the fewest layers that keep
their per-layer overrides.
"""

import pytest
import torch

import zoo
from zoo.train.config import ZooConfig

SMALL_MODEL = {"d_model": 64, "n_layers": 2, "vocab_size": 97, "max_seq_len": 64}
MIXER_OPTIONS = {"attention": {"n_heads": 4, "n_kv_heads": 2}}


def preset_config(name: str) -> ZooConfig:
    config = zoo.load_config(name)
    if not name.endswith("-tiny"):
        keep = max([1, *(i + 1 for i in config.model.layers)])
        config = zoo.load_config(name, {"model.n_layers": max(2, keep), "model.vocab_size": 257})
    if config.model.vocab_size is None:
        config = zoo.load_config(config, {"model.vocab_size": 257})
    return config


def mixer_config(mixer: str) -> ZooConfig:
    overrides = {f"model.{k}": v for k, v in SMALL_MODEL.items()}
    overrides["model.mixer"] = {"type": mixer, **MIXER_OPTIONS.get(mixer, {})}
    return zoo.load_config("dense-tiny", overrides)


CASES = [pytest.param(lambda m=m: mixer_config(m), id=f"mixer-{m}") for m in zoo.available_blocks("mixer")]
CASES += [pytest.param(lambda p=p: preset_config(p), id=f"preset-{p}") for p in zoo.list_models()]


def build(make_config, dtype=torch.float32):
    model = zoo.build_model(make_config()).to(dtype).eval()
    return model, model.config.vocab_size


@pytest.mark.parametrize("make_config", CASES)
def test_causal(make_config):
    model, vocab = build(make_config)
    T, k = 24, 13
    ids = torch.randint(0, vocab, (2, T))
    changed = ids.clone()
    changed[:, k:] = torch.randint(0, vocab, (2, T - k))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, k:], b[:, k:]), "the changed tokens should change later logits"


@pytest.mark.parametrize("make_config", CASES)
def test_forward_backward_finite(make_config):
    model, vocab = build(make_config)
    model.train()
    ids = torch.randint(0, vocab, (2, 16))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 16, vocab)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # an adapter freezes its base
    assert trainable
    for name, p in model.named_parameters():
        assert (p.grad is not None and torch.isfinite(p.grad).all()) if p.requires_grad else p.grad is None, name


@pytest.mark.parametrize("make_config", CASES)
def test_greedy_generate_equals_full_forward_argmax(make_config):
    model, vocab = build(make_config, torch.float64)
    prompt = torch.randint(0, vocab, (2, 9))
    generated = model.generate(prompt, max_new_tokens=7)
    assert generated.shape == (2, 16) and torch.equal(generated[:, :9], prompt)
    with torch.no_grad():
        logits = model(generated).logits
    assert torch.equal(logits[:, 8:-1].argmax(-1), generated[:, 9:])


def test_every_preset_builds_and_lists_sorted():
    names = zoo.list_models()
    assert names == sorted(names) and "dense-tiny" in names and "dense-125m" in names
    assert zoo.list_models("dense-*") == [n for n in names if n.startswith("dense-")]


def test_num_parameters_counts_tied_weights_once():
    config = zoo.load_config("dense-tiny", {"model.n_layers": 1})
    tied = zoo.build_model(config)
    untied = zoo.build_model(zoo.load_config(config, {"model.tie_embeddings": False}))
    extra = config.model.vocab_size * config.model.d_model
    assert untied.num_parameters() - tied.num_parameters() == extra
    assert tied.num_parameters(active=True) == tied.num_parameters()


def test_residual_projections_use_depth_scaled_init():
    model = zoo.create_model("dense-tiny", n_layers=8, d_model=256)
    std = model.config.init_std
    out_std = model.blocks[0].mixer.out.weight.std().item()
    qkv_std = model.blocks[0].mixer.qkv.weight.std().item()
    assert abs(qkv_std - std) < 0.1 * std
    assert abs(out_std - std / 16**0.5) < 0.1 * std / 4


def test_loss_is_shifted_cross_entropy_in_float64():
    model, vocab = build(lambda: mixer_config("attention"), torch.float64)
    ids = torch.randint(0, vocab, (2, 10))
    out = model(ids, labels=ids)
    logp = out.logits.log_softmax(-1)
    expected = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.lm_loss, expected, rtol=1e-12, atol=1e-12)
    assert out.aux_loss is None and out.mtp_loss is None and torch.equal(out.loss, out.lm_loss)
