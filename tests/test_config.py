"""Configs: exact round trips, overrides, per-layer blocks, clear errors, user-registered blocks."""

import re
from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import nn

import zoo
from zoo import registry
from zoo.train.config import ZooConfig


@pytest.mark.parametrize("name", zoo.list_models())
def test_yaml_dataclass_json_round_trip_is_identity(name):
    config = zoo.load_config(name)
    assert ZooConfig.from_dict(yaml.safe_load(config.to_yaml())) == config
    assert ZooConfig.from_json(config.to_json()) == config
    assert ZooConfig.from_json(ZooConfig.from_json(config.to_json()).to_json()).to_json() == config.to_json()


def test_round_trip_keeps_per_layer_overrides(tmp_path):
    config = zoo.load_config("dense-tiny", ["model.layers.1.ffn.d_hidden=128", "model.layers.0.mixer.n_kv_heads=1"])
    assert config.model.layer_blocks(1)[1].options.d_hidden == 128
    assert config.model.layer_blocks(0)[0].options.n_kv_heads == 1
    assert config.model.layer_blocks(0)[0].options.n_heads == 8  # merged over the model's default mixer
    path = tmp_path / "c.json"
    path.write_text(config.to_json())
    assert zoo.load_config(path) == config


def test_overrides_from_strings_dicts_and_keywords():
    config = zoo.load_config("dense-tiny", ["model.n_layers=2", "train.optimizer.lr=1e-4", "hub.repo_id=org/x"])
    assert (config.model.n_layers, config.train.optimizer.lr, config.hub.repo_id) == (2, 1e-4, "org/x")
    assert zoo.load_config("dense-tiny", {"model.d_model": 128}).model.d_model == 128
    model = zoo.create_model("dense-tiny", n_layers=1, mixer={"n_heads": 4})
    assert len(model.blocks) == 1 and model.blocks[0].mixer.n_heads == 4 and model.blocks[0].mixer.n_kv_heads == 4


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {norm: {type: rmsnorm, eps: 1e-5}}\ntrain: {optimizer: {lr: 3e-4}}\n")
    config = zoo.load_config(path)
    assert config.model.norm.options.eps == 1e-5 and config.train.optimizer.lr == 3e-4


@pytest.mark.parametrize("overrides, message", [
    (["model.d_modle=64"], r"unknown key 'model.d_modle'; did you mean d_model\?"),
    (["train.optimizer.learning_rate=1"], r"unknown key 'train.optimizer.learning_rate'.*Valid keys: lr"),
    (["model.mixer.type=atention"], r"model.mixer.type: unknown mixer block 'atention' \(did you mean attention[^)]*\?\); "
                                    r"registered mixer blocks: attention"),
    (["model.ffn.type=nope"], r"unknown ffn block 'nope'.*registered ffn blocks: .*mlp"),
    (["model.mixer.n_heads=3"], r"model.mixer: n_heads=3 does not divide model.d_model=256"),
    (["model.mixer.n_kv_heads=3"], r"model.mixer: n_kv_heads=3 does not divide n_heads=8"),
    (["model.n_layers=0"], r"model: n_layers must be positive, got 0"),
    (["model.ffn.d_hidden=-4"], r"model.ffn: d_hidden must be positive, got -4"),
    (["model.d_model=abc"], r"model.d_model: expected an integer, got 'abc'"),
    (["model.tie_embeddings=3"], r"model.tie_embeddings: expected true or false, got 3"),
    (["model.mixer.backend=flash"], r"model.mixer.backend: 'flash' is not allowed; choose one of auto, sdpa, eager, xformers"),
    (["model.layers.9.ffn.d_hidden=8"], r"model.layers.9: layer index out of range for model.n_layers=4"),
    (["model.layers.1.mixer.n_heads=5"], r"model.layers.1.mixer: n_heads=5 does not divide model.d_model=256"),
    (["model.n_layers"], r"not of the form dotted.key=value"),
    (["train.precision=bf17"], r"train.precision: 'bf17' is not a Lightning precision \(did you mean bf16[^)]*\); "
                               r"choose auto or one of bf16-mixed, bf16-true, 16-mixed, 16-true, 32-true, 64-true"),
    (["train.trainer.strategy=bogus"], r"train.trainer.strategy: 'bogus' is not a Lightning strategy; "
                                       r"registered: auto, ddp, .*ddp_spawn.*deepspeed.*fsdp"),
    (["train.trainer.accelerator=cdua"], r"train.trainer.accelerator: 'cdua' is not a Lightning accelerator "
                                         r"\(did you mean cuda"),
    (["train.trainer.devices=0"], r"train.trainer.devices: 0 is not allowed; use a positive device count, "
                                  r"-1 \(all devices\), 'auto', or a list"),
    (["train.trainer.devices=-2"], r"train.trainer.devices: -2 is not allowed"),
    (["train.trainer.devices=[0, 0]"], r"train.trainer.devices: \[0, 0\] is not allowed"),
    (["train.trainer.devices=[]"], r"train.trainer.devices: \[\] is not allowed"),
    (["train.trainer.devices=some"], r"train.trainer.devices: 'some' is not allowed"),
    (["train.trainer.gradient_clip_val=-1"], r"train.trainer.gradient_clip_val must be >= 0 or null"),
    (["train.optimizer.betas=[2, 3]"], r"train.optimizer.betas: each must be in \[0, 1\), got \[2.0, 3.0\]"),
    (["train.optimizer.betas=[0.9, 1.0]"], r"train.optimizer.betas: each must be in \[0, 1\)"),
    (["train.optimizer.weight_decay=-1"], r"train.optimizer.weight_decay must be >= 0, got -1.0"),
    (["train.optimizer.eps=0"], r"train.optimizer: eps must be positive, got 0.0"),
    (["train.schedule.warmup_steps=-5"], r"train.schedule.warmup_steps must be >= 0, got -5"),
    (["train.data.tokenizer=nonsense"], r"train.data.tokenizer: 'nonsense' is not allowed; use bytes, bpe, or the "
                                        r"path of a tokenizer.json file"),
    (["train.data.bpe_vocab_size=100"], r"train.data.bpe_vocab_size must exceed 257 \(the 256 byte symbols and "
                                        r"<\|endoftext\|>, plus at least one merge\), got 100"),
    (["train.trainer.extra={precision: 16, logger: false, max_epochs: 2}"],
     r"train.trainer.extra: precision, logger repeat lightning.Trainer arguments that zoo already passes "
     r"\(precision is set by train.precision; logger is set by zoo, for metrics.csv"),
    (["train.trainer.precision=16-mixed"], r"unknown key 'train.trainer.precision'; it is set by train.precision"),
    (["train.trainer.max_steps=5"], r"unknown key 'train.trainer.max_steps'; it is set by train.max_steps"),
    (["hub.push=true"], r"hub.push=true needs hub.repo_id"),
])
def test_bad_inputs_name_the_key(overrides, message):
    with pytest.raises(zoo.ConfigError, match=message):
        zoo.load_config("dense-tiny", overrides)


@pytest.mark.parametrize("overrides", [
    ["train.precision=32"], ["train.precision=bf16-true"], ["train.trainer.devices=auto"],
    ["train.trainer.devices=-1"], ["train.trainer.devices=[0, 1]"], ["train.trainer.devices=0,1"],
    ["train.trainer.strategy=DDP"], ["train.trainer.strategy=ddp_find_unused_parameters_true"],
    ["train.trainer.accelerator=cpu"], ["train.trainer.gradient_clip_val=null"],
    ["train.trainer.extra={max_epochs: 2, enable_progress_bar: false}"], ["train.schedule.warmup_steps=0"],
    ["train.optimizer.betas=[0.0, 0.999]", "train.optimizer.weight_decay=0"],
    ["train.data.tokenizer=runs/x/final/tokenizer.json"], ["train.data.bpe_vocab_size=258"],
    ["hub.push=true", "hub.repo_id=org/name"],
])
def test_allowed_train_values_load_and_round_trip(overrides):
    config = zoo.load_config("dense-tiny", overrides)
    assert ZooConfig.from_json(config.to_json()) == config


def test_lightning_values_match_lightning():
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import (_PRECISION_INPUT_INT, _PRECISION_INPUT_STR,
                                                              _PRECISION_INPUT_STR_ALIAS)
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    from zoo.train.config import _BUILTIN_ACCELERATORS, _BUILTIN_STRATEGIES, LIGHTNING_PRECISIONS

    lightning_precisions = get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_INT) + get_args(
        _PRECISION_INPUT_STR_ALIAS)
    assert sorted(map(str, LIGHTNING_PRECISIONS)) == sorted(map(str, lightning_precisions))
    assert set(_BUILTIN_STRATEGIES) <= {"auto", *StrategyRegistry.available_strategies()}
    assert set(_BUILTIN_ACCELERATORS) <= {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}


def test_config_error_is_a_value_error_and_unknown_preset_suggests():
    assert issubclass(zoo.ConfigError, ValueError)
    with pytest.raises(zoo.ConfigError, match="unknown preset 'dense-tinny'; did you mean dense-tiny"):
        zoo.load_config("dense-tinny")


def test_custom_ffn_registered_in_test_builds_from_yaml(tmp_path):
    @dataclass
    class ScaledReluConfig:
        d_hidden: int = 32
        scale: float = 1.0

    @zoo.register("ffn", "scaled_relu", config=ScaledReluConfig)
    class ScaledRelu(nn.Module):
        def __init__(self, config: ScaledReluConfig, ctx: zoo.BlockContext):
            super().__init__()
            self.scale = config.scale
            self.up, self.down = nn.Linear(ctx.d_model, config.d_hidden), nn.Linear(config.d_hidden, ctx.d_model)

        def forward(self, x, aux):
            return self.scale * self.down(torch.relu(self.up(x)))

    try:
        assert "scaled_relu" in zoo.available_blocks("ffn")
        path = tmp_path / "custom.yaml"
        path.write_text(
            "model:\n  vocab_size: 50\n  d_model: 32\n  n_layers: 2\n"
            "  mixer: {type: attention, n_heads: 4}\n  ffn: {type: scaled_relu, d_hidden: 48, scale: 0.5}\n"
            "  layers: {1: {ffn: {type: mlp, d_hidden: 64}}}\n")
        model = zoo.create_model(path)
        assert isinstance(model.blocks[0].ffn, ScaledRelu) and model.blocks[0].ffn.up.out_features == 48
        assert model.blocks[0].ffn.scale == 0.5 and type(model.blocks[1].ffn).__name__ == "MLP"
        ids = torch.randint(0, 50, (1, 8))
        assert model(ids, labels=ids).loss.isfinite()
        with pytest.raises(zoo.ConfigError, match=r"unknown key 'model.ffn.scal'; did you mean scale"):
            zoo.load_config(path, ["model.ffn.scal=2"])
    finally:
        registry.unregister("ffn", "scaled_relu")
    with pytest.raises(zoo.ConfigError, match="unknown ffn block 'scaled_relu'"):
        zoo.load_config(path)


def test_unset_vocab_size_fails_at_build_with_a_clear_message():
    config = zoo.load_config("dense-tiny", {"model.vocab_size": None})
    with pytest.raises(zoo.ConfigError, match="model.vocab_size is unset"):
        zoo.build_model(config)


# --------------------------------------------------------------------------- non-finite numbers, every float key

def _float_keys(cls, prefix: str) -> list[tuple[str, object]]:
    """``(dotted key, value holding one NaN placeholder)`` for every float field of a config dataclass tree
    (tuples of floats get the placeholder first); BlockSpec fields are covered through the registry."""
    import dataclasses
    import types
    import typing

    from zoo.schema import BlockSpec

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = options[0] if len(options) == 1 else tp
        path = f"{prefix}{f.name}"
        if tp is float:
            keys.append((path, None))
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] == (float,):
            keys.append((path, "tuple"))
        elif dataclasses.is_dataclass(tp) and tp is not BlockSpec:
            keys.extend(_float_keys(tp, path + "."))
    return keys


# Where a block of each kind is configured: model.mixer: {type: name, ...}; converters under model.<name>.
_KIND_SECTIONS = {"mixer": "model.mixer", "ffn": "model.ffn", "norm": "model.norm", "objective": "train.objective"}


def _nested(path: str, value) -> dict:
    raw: dict = {}
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


def _non_finite_cases():
    cases = [(path, kind, {}) for path, kind in _float_keys(ZooConfig, "")]
    for kind in registry.KINDS:
        for name in registry.available(kind):
            entry = registry.lookup(kind, name)
            section = _KIND_SECTIONS.get(kind, f"model.{name}" if kind == "converter" else None)
            for key, shape in _float_keys(entry.config, ""):
                spec = {} if kind == "converter" else {"type": name}
                cases.append((f"{section}.{key}" if section else f"{kind}:{name}.{key}", shape, spec))
    return cases


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_every_float_key_rejects_non_finite_values(bad):
    from zoo.schema import typed

    cases = _non_finite_cases()
    assert {"model.init_std", "train.optimizer.lr", "model.ffn.capacity_factor", "model.mixer.rope_theta",
            "model.norm.eps", "train.optimizer.betas"} <= {path for path, _, _ in cases}
    for path, shape, spec in cases:
        value = [bad, 0.9] if shape == "tuple" else bad
        named = f"{path}[0]" if shape == "tuple" else path
        if ":" in path:  # a kind no config section holds yet: its dataclass directly
            kind_name, key = path.split(".", 1)
            entry = registry.lookup(*kind_name.split(":"))
            with pytest.raises(zoo.ConfigError, match=re.escape(key)):
                typed(entry.config, {key: value}, kind_name)
            continue
        section, key = path.rsplit(".", 1)
        raw = _nested(section, {**spec, key: value}) if spec else _nested(path, value)
        with pytest.raises(zoo.ConfigError, match=re.escape(named) + r".*finite"):
            ZooConfig.from_dict(raw)


def test_block_type_must_be_a_name():
    with pytest.raises(zoo.ConfigError, match=r"model\.mixer\.type: unknown mixer block \[1, 2\]"):
        zoo.load_config("dense-tiny", ["model.mixer.type=[1,2]"])
