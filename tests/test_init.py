"""Construction apart from initialisation (zoo/model/build.py and each block's ``init_own_weights``).

Parametrized over every preset, cut to two or three layers and a narrow width: the init pass fills every
parameter and buffer of a meta-built model, a seed fixes every weight, and loading allocates only what the
checkpoint does not hold.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from zoo.blocks.moe import SWITCH_EXPERT_INIT_SCALE
from zoo.checkpoint.pretrained import load_model
from zoo.errors import ConfigError
from zoo.model import build_skeleton, init_weights, materialize


def small_config(name: str) -> zoo.ModelConfig:
    """``name`` at two layers (more where a per-layer override needs them), vocab 257, d_model 64 (96 where
    64 does not split into its heads)."""
    config = zoo.load_config(name)
    overrides = {"model.n_layers": max([2, *(i + 1 for i in config.model.layers)]), "model.vocab_size": 257}
    for d_model in (64, 96):
        try:
            return zoo.load_config(name, {**overrides, "model.d_model": d_model}).model
        except ConfigError:
            continue
    raise AssertionError(f"no small width fits {name}")


PRESETS = zoo.list_models()


def all_tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


@pytest.mark.parametrize("name", PRESETS)
def test_init_pass_fills_every_parameter_and_buffer(name):
    model = build_skeleton(small_config(name)).to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for _, tensor in all_tensors(model):
            tensor.fill_(float("nan"))
    init_weights(model)
    assert [n for n, t in all_tensors(model) if t.isnan().any()] == []


@pytest.mark.parametrize("name", PRESETS)
def test_same_seed_same_weights(name):
    config = small_config(name)
    torch.manual_seed(7)
    a = zoo.build_model(config).state_dict()
    torch.manual_seed(7)
    b = zoo.build_model(config).state_dict()
    torch.manual_seed(8)
    c = zoo.build_model(config).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_build_model_is_tied_on_the_default_device():
    model = zoo.build_model(small_config("dense-tiny"))
    assert model.config.tie_embeddings and model.head.weight is model.embed.weight
    assert {t.device.type for _, t in all_tensors(model)} == {"cpu"}


def test_init_statistics_of_each_family():
    """The scales the blocks keep from their BlockContext: N(0, init_std) for inputs, init_std / sqrt(2 L)
    for residual outputs (GPT-2), Switch experts at sqrt(0.1) of those (Fedus et al. 2021 §2.4), norms at 1,
    biases and the loss-free balancing state at 0."""
    def close(tensor, std, rel=0.1):
        return abs(tensor.std().item() - std) < rel * std

    overrides = {"model.n_layers": 8, "model.d_model": 256, "model.vocab_size": 1024}
    switch = zoo.build_model(zoo.load_config("switch-tiny", overrides))
    std, out_std = switch.config.init_std, switch.config.init_std / 16 ** 0.5
    layer = next(b.ffn for b in switch.blocks if hasattr(b.ffn, "experts"))
    assert close(layer.experts.gate_up_proj, SWITCH_EXPERT_INIT_SCALE ** 0.5 * std)
    assert close(layer.experts.down_proj, SWITCH_EXPERT_INIT_SCALE ** 0.5 * out_std)
    assert close(layer.router.weight, std, rel=0.2)
    assert close(switch.embed.weight, std)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in switch.named_parameters() if n.endswith("norm.weight"))

    moe = zoo.build_model(zoo.load_config("deepseek-moe-tiny", overrides))  # loss-free balancing on
    router = next(b.ffn.router for b in moe.blocks if hasattr(b.ffn, "router"))
    assert torch.equal(router.expert_bias, torch.zeros(router.n_experts))
    assert torch.equal(router.expert_load, torch.zeros(router.n_experts))

    retnet = zoo.build_model(zoo.load_config("retnet-tiny", overrides))
    mixer = retnet.blocks[0].mixer
    assert close(mixer.proj.weight, std) and close(mixer.out.weight, out_std)
    assert torch.equal(mixer.norm_weight, torch.ones_like(mixer.norm_weight))
    assert mixer.norm_bias is None or torch.equal(mixer.norm_bias, torch.zeros_like(mixer.norm_bias))


def test_a_standalone_block_is_initialised_by_the_pass():
    from zoo.blocks.attention import Attention, AttentionConfig
    from zoo.registry import BlockContext

    ctx = BlockContext(d_model=64, n_layers=2, layer_idx=0, max_seq_len=32, init_std=0.02)
    with torch.device("meta"):
        attn = Attention(AttentionConfig(n_heads=4, qk_norm=True), ctx)
    init_weights(attn.to_empty(device="cpu"))
    assert abs(attn.qkv.weight.std().item() - 0.02) < 0.002
    assert torch.equal(attn.q_norm.weight, torch.ones(64))


@pytest.mark.parametrize("name", ["deepseek-moe-tiny", "mtp-tiny"])
def test_loading_assigns_the_checkpoint_and_initialises_only_the_rest(name):
    """The checkpoint's tensors become the model's (same storage, no copy); what it does not hold (the
    non-persistent load counts) is allocated and initialised; nothing stays on meta."""
    config = small_config(name)  # deepseek-moe-tiny: loss-free balancing on
    source = zoo.build_model(config)
    state_dict = {k: v.clone() for k, v in source.state_dict().items()
                  if k != "head.weight" or not config.tie_embeddings}
    model = load_model(config, state_dict, "test")
    for name_, tensor in model.state_dict().items():
        if name_ in state_dict:
            assert tensor.data_ptr() == state_dict[name_].data_ptr(), name_
    assert not any(t.is_meta for _, t in all_tensors(model))
    persistent = set(model.state_dict())
    rest = [(n, t) for n, t in model.named_buffers() if n not in persistent]
    assert (name == "deepseek-moe-tiny") == bool(rest)
    assert all(torch.equal(t, torch.zeros_like(t)) for _, t in rest)


def test_materialize_allocates_only_the_owners_of_what_is_missing():
    model = build_skeleton(small_config("mtp-tiny"))
    held = {k for k in model.state_dict() if not k.startswith("mtp.")} | {"head.weight"}
    materialize(model, held, "cpu")
    for name, tensor in all_tensors(model):
        assert tensor.is_meta != name.startswith("mtp."), name
    assert not any(t.isnan().any() for n, t in all_tensors(model) if n.startswith("mtp."))


def test_building_and_loading_stay_off_torchs_python_meta_kernels():
    """Nothing is drawn on meta tensors (``normal_`` there runs torch's Python references, which import
    sympy, a second or more on first use) and allocation avoids ``empty_like``'s meta path likewise."""
    fixture = Path(__file__).parent / "fixtures" / "zoo-0.1" / "moe"
    code = (f"import sys, zoo; zoo.from_pretrained({str(fixture)!r}); zoo.create_model('deepseek-moe-tiny', "
            "n_layers=2); assert 'sympy' not in sys.modules, 'sympy imported'; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")  # (zoo.interop.registration)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
