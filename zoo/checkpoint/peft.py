"""LoRA adapters saved by the ``peft`` library for a transformers Llama-family model (``llama``, ``mistral``,
``qwen2``), loaded onto the zoo model imported from that checkpoint.

peft stores one ``(lora_A (r, in), lora_B (out, r))`` pair per adapted transformers module
(``model.layers.{i}.self_attn.q_proj``, ...) and scales by ``lora_alpha / r``. zoo fuses ``q_proj, k_proj,
v_proj`` into ``qkv`` and ``gate_proj, up_proj`` into ``gate_up``, but keeps one pair per logical projection
(:mod:`zoo.adapters.lora`), so each peft pair lands in its own block of the fused module's factors; a part
peft left alone keeps ``B = 0`` (and DoRA's magnitude ``||W0||``), computing its base exactly. Only what
zoo's ``lora`` computes identically is accepted: no ``rank_pattern`` / ``alpha_pattern``, no rsLoRA, no
trained biases, no ``fan_in_fan_out``; anything else is a :class:`CheckpointError` naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from zoo.adapters import adapter_modules, adapter_state_dict
from zoo.errors import CheckpointError

# transformers module -> (zoo module, logical part) in the Llama-family layout zoo imports.
_MODULES = {"self_attn.q_proj": ("mixer.qkv", 0), "self_attn.k_proj": ("mixer.qkv", 1),
            "self_attn.v_proj": ("mixer.qkv", 2), "self_attn.o_proj": ("mixer.out", 0),
            "mlp.gate_proj": ("ffn.gate_up", 0), "mlp.up_proj": ("ffn.gate_up", 1), "mlp.down_proj": ("ffn.down", 0)}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.(lora_A|lora_B|lora_magnitude_vector)"
                  r"(?:\.weight)?")
_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "bias": "none", "fan_in_fan_out": False}


def base_name(config: Mapping) -> str | None:
    """The base a peft adapter names: a local path, or ``hf-hub:ORG/NAME[@REVISION]``."""
    name, revision = config.get("base_model_name_or_path"), config.get("revision")
    if not name:
        return None
    if Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return name
    return f"hf-hub:{name}" + (f"@{revision}" if revision else "")


def adapter_spec(config: Mapping, source: str) -> dict:
    """``model.adapter`` for a peft ``adapter_config.json``; the targets are filled from the tensors later
    (:func:`to_zoo_tensors` checks them), so here every module peft can name is a target."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{source!r}: peft_type {config.get('peft_type')!r} is not supported; zoo loads "
                              "peft LoRA adapters (peft_type LORA)")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed) not in (allowed, None):
            raise CheckpointError(f"{source!r}: peft option {key}={config[key]!r} is not supported (zoo's lora "
                                  f"computes {key}={allowed!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise CheckpointError(f"{source!r}: target_modules must be a list of module names, got {targets!r}")
    names = sorted({t.rpartition(".")[2] for t in targets})
    unknown = [t for t in names if not any(m.endswith("." + t) for m in _MODULES)]
    if unknown:
        raise CheckpointError(f"{source!r}: target_modules {unknown} have no zoo counterpart; supported: "
                              f"{sorted(m.split('.')[1] for m in _MODULES)}")
    zoo_targets = sorted({f"blocks.*.{_MODULES[m][0]}" for m in _MODULES if m.split(".")[1] in names})
    return {"type": "lora", "r": int(config["r"]), "alpha": float(config["lora_alpha"]),
            "dropout": float(config.get("lora_dropout") or 0.0), "targets": zoo_targets,
            "dora": bool(config.get("use_dora", False))}


def to_zoo_tensors(tensors: Mapping[str, torch.Tensor], model, source: str) -> dict[str, torch.Tensor]:
    """peft's tensors as the adapter state dict of ``model`` (the adapted zoo model); the fused modules'
    parts peft does not adapt keep their fresh values (``B = 0``: the base exactly)."""
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    modules = dict(adapter_modules(model))
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match.group(2) not in _MODULES:
            raise CheckpointError(f"{source!r}: peft tensor {key!r} has no zoo counterpart")
        layer, (target, part), kind = match.group(1), _MODULES[match.group(2)], match.group(3)
        name = f"blocks.{layer}.{target}"
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{source!r}: peft tensor {key!r} targets {name}, which the model lacks")
        r = module.lora_A.shape[0] // len(module.parts)
        rows = slice(sum(module.parts[:part]), sum(module.parts[:part + 1]))
        destination = {"lora_A": (f"{name}.lora_A", slice(part * r, (part + 1) * r)),
                       "lora_B": (f"{name}.lora_B", rows), "lora_magnitude_vector": (f"{name}.lora_magnitude", rows)}
        if kind == "lora_magnitude_vector" and f"{name}.lora_magnitude" not in state:
            raise CheckpointError(f"{source!r}: {key!r} is a DoRA magnitude, but the adapter config has no use_dora")
        dest, index = destination[kind]
        if state[dest][index].shape != tensor.shape:
            raise CheckpointError(f"{source!r}: {key!r} has shape {tuple(tensor.shape)}, zoo's {dest}[{index.start}:"
                                  f"{index.stop}] {tuple(state[dest][index].shape)}")
        state[dest][index] = tensor.to(state[dest].dtype)
    return state
