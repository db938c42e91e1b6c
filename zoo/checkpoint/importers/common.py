"""What every transformers import shares: reading the HF config, rope settings, and moving tensors.

A converter takes the HF ``config.json`` (as :class:`HFConfig`) and the checkpoint's tensors, and returns
a zoo config mapping plus a state dict under zoo names. Tensors are *taken* from the HF state dict
(:meth:`Tensors.take`), so whatever is left at the end is a tensor the converter did not understand
and is reported by name rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from zoo import registry
from zoo.errors import CheckpointError

_ABSENT = object()


class HFConfig:
    """A transformers ``config.json`` with errors that name the checkpoint, the key and what is supported."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source
        self.model_type = raw["model_type"]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key, default)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if self.raw.get(key) is None:
            raise CheckpointError(f"{self.source}: {self.model_type} config.json lacks {key!r}")
        return self.raw[key]

    def only(self, key: str, supported: tuple, default: Any = _ABSENT) -> Any:
        """The value of ``key``, which must be one of ``supported`` (absent counts as ``default``)."""
        value = self.raw.get(key, supported[0] if default is _ABSENT else default)
        if value not in supported:
            raise self.unsupported(key, value, ", ".join(map(repr, supported)))
        return value

    def unsupported(self, key: str, value: Any, supported: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {self.model_type} option {key}={value!r} is not supported by "
                               f"the zoo import; supported: {supported}")


def rope_options(config: HFConfig) -> dict:
    """``rope_theta`` and ``rope_scaling`` of a zoo mixer from ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (older configs). Scaling types ``linear``, ``dynamic``, ``llama3`` and
    ``yarn`` map key for key onto zoo's :mod:`zoo.blocks.rope` scalings, with transformers' defaults: a missing
    ``original_max_position_embeddings`` is ``max_position_embeddings`` (a top-level one wins, as there), a
    missing yarn ``factor`` their ratio, and ``dynamic``'s original length is ``max_position_embeddings``."""
    params = config.raw.get("rope_parameters")
    params = dict(params if isinstance(params, dict) else config.raw.get("rope_scaling") or {})
    if "rope_type" not in params and "type" not in params and any(isinstance(v, dict) for v in params.values()):
        raise config.unsupported("rope_parameters", sorted(params), "one rope for every layer (not nested per "
                                 "layer type)")
    params.setdefault("rope_theta", config.raw.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", config.raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise config.unsupported("partial_rotary_factor", partial, "1.0 (rope on every head dimension)")
    theta = params.get("rope_theta")
    options = {"rope_theta": float(theta if theta is not None else 10000.0)}
    if rope_type == "default":
        return options
    entry = registry.lookup("rope_scaling", rope_type)
    if entry is None:
        supported = ["default", *registry.available("rope_scaling")]
        raise config.unsupported("rope_type", rope_type, ", ".join(map(repr, supported)))
    scaling = {f.name: params[f.name] for f in dataclasses.fields(entry.config) if params.get(f.name) is not None}
    max_positions = config.get("max_position_embeddings")
    if rope_type == "dynamic":
        scaling["original_max_position_embeddings"] = max_positions
    elif "original_max_position_embeddings" in {f.name for f in dataclasses.fields(entry.config)}:
        original = (config.raw.get("original_max_position_embeddings")
                    or scaling.get("original_max_position_embeddings") or max_positions)
        scaling["original_max_position_embeddings"] = original
        if rope_type == "yarn" and "factor" not in scaling and max_positions and original:
            scaling["factor"] = max_positions / original
    return {**options, "rope_scaling": {"type": rope_type, **scaling}}


def check_dense_options(config: HFConfig) -> None:
    config.only("hidden_act", ("silu",))
    if config.get("pretraining_tp", 1) != 1:
        raise config.unsupported("pretraining_tp", config.raw["pretraining_tp"], "1")


def decoder_config(config: HFConfig, mixer: dict, ffn: dict, layers: dict | None = None,
                   max_seq_len: int | None = None) -> dict:
    """The zoo config mapping of a pre-norm decoder with RMSNorm."""
    return {"model": {
        "vocab_size": config.require("vocab_size"),
        "d_model": config.require("hidden_size"),
        "n_layers": config.require("num_hidden_layers"),
        "max_seq_len": max_seq_len or config.get("max_position_embeddings", 4096),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "norm": {"type": "rmsnorm", "eps": float(config.get("rms_norm_eps", 1e-6))},
        "mixer": mixer, "ffn": ffn, "layers": layers or {},
    }}


def attention_options(config: HFConfig, qkv_bias: bool) -> dict:
    heads = config.require("num_attention_heads")
    head_dim = config.get("head_dim") or config.require("hidden_size") // heads
    return {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads", heads),
            "head_dim": head_dim, **rope_options(config), "qkv_bias": qkv_bias}


class Tensors:
    """The HF tensors, consumed by name; :meth:`finish` reports what no converter took."""

    def __init__(self, state_dict: dict[str, torch.Tensor], source: str):
        self.hf, self.source = dict(state_dict), source
        self.zoo: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        return name in self.hf

    def take(self, name: str) -> torch.Tensor:
        if name not in self.hf:
            raise CheckpointError(f"{self.source}: the transformers checkpoint lacks the tensor {name!r}")
        return self.hf.pop(name)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.zoo[name] = tensor

    def move(self, hf_name: str, zoo_name: str) -> None:
        self.put(zoo_name, self.take(hf_name))

    def cat(self, hf_names: list[str], zoo_name: str) -> None:
        """One fused zoo tensor from several HF ones, concatenated along the output rows (dim 0)."""
        self.put(zoo_name, torch.cat([self.take(n) for n in hf_names], dim=0))

    def drop(self, predicate) -> list[str]:
        dropped = [k for k in self.hf if predicate(k)]
        for k in dropped:
            del self.hf[k]
        return dropped

    def finish(self) -> dict[str, torch.Tensor]:
        if self.hf:
            raise CheckpointError(f"{self.source}: unexpected tensors in the transformers checkpoint that the "
                                  f"zoo import does not map: {sorted(self.hf)}")
        return self.zoo


def embeddings_and_head(config: HFConfig, t: Tensors) -> None:
    """Embedding, final norm and output head (absent or dropped when tied)."""
    t.move("model.embed_tokens.weight", "embed.weight")
    t.move("model.norm.weight", "norm.weight")
    if config.get("tie_word_embeddings", False):
        t.drop(lambda k: k == "lm_head.weight")
    else:
        t.move("lm_head.weight", "head.weight")
    t.drop(lambda k: k.endswith("rotary_emb.inv_freq"))  # derived buffers some old checkpoints hold


def layer_norms(t: Tensors, i: int) -> None:
    t.move(f"model.layers.{i}.input_layernorm.weight", f"blocks.{i}.mixer_norm.weight")
    t.move(f"model.layers.{i}.post_attention_layernorm.weight", f"blocks.{i}.ffn_norm.weight")


def gqa_attention(t: Tensors, i: int, bias: bool, qk_norm: bool = False) -> None:
    """Separate q/k/v projections -> zoo's fused ``qkv`` (rows q, then k, then v); o -> ``out``; with
    ``qk_norm`` the q and k norms (OLMoE's over the projections, Qwen3's per head)."""
    src, dst = f"model.layers.{i}.self_attn", f"blocks.{i}.mixer"
    t.cat([f"{src}.{p}_proj.weight" for p in "qkv"], f"{dst}.qkv.weight")
    if bias:
        t.cat([f"{src}.{p}_proj.bias" for p in "qkv"], f"{dst}.qkv.bias")
    t.move(f"{src}.o_proj.weight", f"{dst}.out.weight")
    if qk_norm:
        t.move(f"{src}.q_norm.weight", f"{dst}.q_norm.weight")
        t.move(f"{src}.k_norm.weight", f"{dst}.k_norm.weight")


def swiglu(t: Tensors, src: str, dst: str, bias: bool = False) -> None:
    """gate_proj/up_proj/down_proj -> zoo's fused ``gate_up`` (gate rows first) and ``down``."""
    for kind in ("weight", "bias") if bias else ("weight",):
        t.cat([f"{src}.gate_proj.{kind}", f"{src}.up_proj.{kind}"], f"{dst}.gate_up.{kind}")
        t.move(f"{src}.down_proj.{kind}", f"{dst}.down.{kind}")


def experts(t: Tensors, src: str, dst: str, n_experts: int, names: tuple[str, str, str]) -> None:
    """Routed experts -> zoo's packed ``gate_up_proj (E, 2I, d)`` (gate rows first) and ``down_proj
    (E, d, I)``, from transformers' packed layout (the same) or the older per-expert tensors
    ``{src}.{e}.{gate}/{up}/{down}.weight`` (``names``: w1/w3/w2 in Mixtral, gate_proj/up_proj/down_proj)."""
    if t.has(f"{src}.gate_up_proj"):
        t.move(f"{src}.gate_up_proj", f"{dst}.gate_up_proj")
        t.move(f"{src}.down_proj", f"{dst}.down_proj")
        return
    gate, up, down = names
    t.put(f"{dst}.gate_up_proj", torch.stack([
        torch.cat([t.take(f"{src}.{e}.{gate}.weight"), t.take(f"{src}.{e}.{up}.weight")]) for e in range(n_experts)]))
    t.put(f"{dst}.down_proj", torch.stack([t.take(f"{src}.{e}.{down}.weight") for e in range(n_experts)]))
