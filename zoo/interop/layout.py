"""What a zoo model is made of, as a transformers family sees it: one mixer for every layer, a routed FFN
and a dense FFN (each used by some layers), and the options of each that a family must represent.

:func:`analyze` refuses what no family has (a per-layer mix of mixers, retention, Switch with its
capacity, converters other than fp8) with a :class:`~zoo.errors.ConfigError` naming the config key, the
block and the option. :func:`option_problems` lists the options of a block that a family cannot express;
options that only matter while training (balancing-loss weights, jitter, the bias update rate, kernels)
are not part of a model's function and are left out of every export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from zoo.errors import ConfigError
from zoo.model.config import ModelConfig
from zoo.interop.mapping import ZooTensors
from zoo.schema import BlockSpec

FAMILY_MIXERS = {"attention": "llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe",
                 "mla": "deepseek_v3"}
# Options of a block that change nothing at inference; an export leaves them out.
TRAINING_ONLY = {"backend", "dispatch", "jitter_noise", "aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight",
                 "bias_update_rate"}


@dataclass
class Layout:
    """``mixer``: every layer's mixer; ``moe``: the routed FFN of the layers not in ``dense_layers`` (None when
    all are dense); ``mlp``: the dense FFN of ``dense_layers`` (None when there are none)."""

    config: ModelConfig
    mixer: BlockSpec
    moe: BlockSpec | None
    mlp: BlockSpec | None
    dense_layers: list[int]

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def describe(self, part: str) -> str:
        """The config key and block of ``part`` ("mixer", "moe" or "mlp"), for messages."""
        spec = getattr(self, part)
        if part == "mixer":
            return f"model.mixer ({spec.type})"
        key = "model.ffn" if self.config.ffn == spec else f"model.layers.{self._first_layer_with(spec)}.ffn"
        return f"{key} ({spec.type})"

    def _first_layer_with(self, spec: BlockSpec) -> int:
        return next(i for i in range(self.config.n_layers) if self.config.layer_blocks(i)[1] == spec)


def analyze(config: ModelConfig) -> Layout:
    """The :class:`Layout` of ``config``, or a :class:`ConfigError` naming what no transformers family has."""
    bad_converters = [spec.type for spec in config.converters]
    if bad_converters:
        raise ConfigError(f"model.converters: the converters {bad_converters} change the model's function and have "
                          "no transformers form; export the model before converting it, or use format='zoo'")
    if config.norm.type != "rmsnorm":
        raise ConfigError(f"model.norm: norm {config.norm.type!r} has no transformers family (they use rmsnorm); "
                          "use format='zoo'")
    first_mixer = config.layer_blocks(0)[0]
    moe = mlp = None
    dense_layers = []
    for i in range(config.n_layers):
        mixer, ffn = config.layer_blocks(i)
        if mixer != first_mixer:
            raise ConfigError(f"model.layers.{i}.mixer: mixer {mixer.type!r} differs from layer 0's "
                              f"{first_mixer.type!r}; a per-layer mix of mixers (a hybrid) has no transformers family: "
                              "use format='zoo'")
        if ffn.type == "mlp":
            mlp = _one_of(mlp, ffn, i, "dense")
            dense_layers.append(i)
        elif ffn.type == "moe":
            moe = _one_of(moe, ffn, i, "routed")
        elif ffn.type == "switch":
            raise ConfigError(f"model.layers.{i}.ffn: ffn 'switch' (top-1 with expert capacity, capacity_factor="
                              f"{ffn.options.capacity_factor}) has no transformers family: use format='zoo'")
        else:
            raise ConfigError(f"model.layers.{i}.ffn: ffn {ffn.type!r} has no transformers family (they have mlp "
                              "and moe): use format='zoo'")
    if first_mixer.type not in FAMILY_MIXERS:
        raise ConfigError(f"model.mixer: mixer {first_mixer.type!r} has no transformers family (attention: "
                          f"{FAMILY_MIXERS['attention']}; mla: {FAMILY_MIXERS['mla']}): use format='zoo'")
    return Layout(config, first_mixer, moe, mlp, dense_layers)


def _one_of(seen: BlockSpec | None, spec: BlockSpec, layer: int, what: str) -> BlockSpec:
    if seen is not None and seen != spec:
        changed = [f"{f.name}={getattr(spec.options, f.name)!r}" for f in dataclasses.fields(spec.options)
                   if getattr(spec.options, f.name) != getattr(seen.options, f.name)]
        raise ConfigError(f"model.layers.{layer}.ffn: this {what} {spec.type!r} FFN differs from an earlier layer's "
                          f"({', '.join(changed)}); transformers families give all {what} layers one shape: "
                          "use format='zoo'")
    return spec


def option_problems(spec: BlockSpec, handled: set[str], where: str) -> list[str]:
    """``where: option=value`` for each option of ``spec`` that is neither ``handled`` by the family nor
    training-only and differs from its default (an option added to a block later is caught here too)."""
    defaults = type(spec.options)()
    return [f"{where}: {f.name}={getattr(spec.options, f.name)!r}" for f in dataclasses.fields(spec.options)
            if f.name not in handled | TRAINING_ONLY and getattr(spec.options, f.name) != getattr(defaults, f.name)]


def require(problems: list[str], ok: bool, message: str) -> None:
    """Add ``message`` to ``problems`` unless ``ok``."""
    if not ok:
        problems.append(message)


@dataclass(frozen=True)
class Family:
    """A transformers model type zoo exports to: ``problems(layout)`` lists what it cannot represent (empty:
    it represents the model exactly), ``hf_config(layout)`` is its ``config.json``, ``tensors(layout, t)`` moves
    the zoo tensors to its names. ``automatic=False``: chosen only when asked for by name (mistral, whose
    models llama represents with the same tensors)."""

    name: str
    architecture: str
    problems: Callable[[Layout], list[str]]
    hf_config: Callable[[Layout], dict]
    tensors: Callable[[Layout, ZooTensors], None]
    mixer: str = "attention"  # the zoo mixer it has
    routed: bool | None = False  # whether its FFNs are routed experts (None: dense and routed layers)
    automatic: bool = True
    mtp: bool = False  # whether it has DeepSeek-V3's multi-token prediction layers

    def near(self, layout: Layout) -> bool:
        """Whether this family has ``layout``'s kind of mixer and FFN (so its problems are worth reporting)."""
        return self.mixer == layout.mixer.type and self.routed in (None, layout.moe is not None)

    def all_problems(self, layout: Layout) -> list[str]:
        problems = self.problems(layout)
        require(problems, self.mtp or layout.config.mtp is None,
                "model.mtp: multi-token prediction modules (only deepseek_v3 stores them)")
        return problems


def base_config(layout: Layout, family: Family) -> dict:
    """The keys every family shares: sizes, the final norm, the embedding tie, the activation."""
    config = layout.config
    return {"model_type": family.name, "architectures": [family.architecture], "vocab_size": config.vocab_size,
            "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
            "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
            "rms_norm_eps": config.norm.options.eps, "initializer_range": config.init_std, "hidden_act": "silu",
            "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def rope_config(options) -> dict:
    """The rope of a mixer's ``options`` (``rope_theta``, ``rope_scaling``) in transformers 5's
    ``rope_parameters`` and the older top-level ``rope_theta``. A scaling's fields are the ``rope_parameters``
    keys of its ``rope_type`` one to one (unset ones left out, for transformers' defaults), except that
    ``dynamic`` takes its original context from the top-level ``max_position_embeddings`` (Peng et al.
    2023, "YaRN", arXiv 2309.00071, §3.3), which is written here in place of the model's ``max_seq_len``."""
    theta, scaling = options.rope_theta, options.rope_scaling
    params = {"rope_type": "default" if scaling is None else scaling.type, "rope_theta": theta}
    config = {"rope_parameters": params, "rope_theta": theta}
    if scaling is not None:
        params.update({f.name: getattr(scaling.options, f.name) for f in dataclasses.fields(scaling.options)
                       if getattr(scaling.options, f.name) is not None})
        if scaling.type == "dynamic":
            config["max_position_embeddings"] = params.pop("original_max_position_embeddings")
    return config


def attention_config(layout: Layout) -> dict:
    options = layout.mixer.options
    return {"num_attention_heads": options.n_heads, "num_key_value_heads": options.kv_heads,
            "head_dim": options.dim_per_head(layout.d_model), "attention_bias": False, **rope_config(options)}


def attention_problems(layout: Layout, qkv_bias: bool | None, qk_norm: str | None) -> list[str]:
    """What a GQA-attention family cannot represent of ``layout.mixer``: ``qkv_bias`` the bias it requires
    (None: either); ``qk_norm`` the q/k normalisation it has, with the model's norm eps (``"projection"``:
    OLMoE's over the whole projections, ``"head"``: Qwen3's per head) or None (none)."""
    where = layout.describe("mixer")
    if layout.mixer.type != "attention":
        return [f"{where}: needs mixer 'attention'"]
    options = layout.mixer.options
    problems = option_problems(layout.mixer, {"n_heads", "n_kv_heads", "head_dim", "rope_theta", "rope_scaling",
                                              "qkv_bias", "qk_norm", "qk_norm_scope", "qk_norm_eps"}, where)
    require(problems, qkv_bias is None or options.qkv_bias == qkv_bias, f"{where}: qkv_bias={options.qkv_bias!r}")
    require(problems, options.qk_norm == (qk_norm is not None), f"{where}: qk_norm={options.qk_norm!r}")
    if qk_norm is not None and options.qk_norm:
        require(problems, options.qk_norm_scope == qk_norm, f"{where}: qk_norm_scope={options.qk_norm_scope!r}")
        eps = layout.config.norm.options.eps
        require(problems, options.qk_norm_eps == eps, f"{where}: qk_norm_eps={options.qk_norm_eps!r} differs from "
                                                      f"model.norm.eps={eps!r}")
    return problems


def mlp_problems(layout: Layout, bias: bool | None = False) -> list[str]:
    """What a family with dense SwiGLU layers of ``bias`` (None: either) cannot represent of ``layout.mlp``."""
    if layout.mlp is None:
        return []
    where = layout.describe("mlp")
    problems = option_problems(layout.mlp, {"d_hidden", "bias"}, where)
    require(problems, bias is None or layout.mlp.options.bias == bias, f"{where}: bias={layout.mlp.options.bias!r}")
    return problems
