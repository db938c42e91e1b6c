"""Checkpoints: ``config.json`` + safetensors weights in a directory, written atomically.

Loading never unpickles: weights are read from safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from huggingface_hub import load_torch_model, save_torch_state_dict

from zoo.config import ZooConfig


def save_pretrained(model, path: str | os.PathLike, max_shard_size: str | int = "5GB",
                    extra_files: dict[str, str | bytes] | None = None, weights_format: str = "hp") -> Path:
    """Write ``config.json`` and ``model.safetensors`` (sharded with an index above ``max_shard_size``)
    to ``path``, plus ``extra_files`` (name -> content, e.g. ``tokenizer.json``). Everything is written under a temporary name first, so a crash never leaves a
    half-written checkpoint at ``path``; an existing checkpoint there is replaced only at the end.
    ``weights_format="fp8"`` stores the linear weights as e4m3 with per-128x128-block inverse scales
    (DeepSeek-V3 layout, :mod:`zoo.fp8.checkpoint`); the default ``"hp"`` keeps the model's dtype."""
    if weights_format not in ("hp", "fp8"):
        raise ValueError(f"weights_format={weights_format!r}; choose 'hp' (high precision) or 'fp8'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        config, state_dict = model.config.to_dict(), _untied_state_dict(model)
        if weights_format == "fp8":
            from zoo.fp8 import checkpoint as fp8_checkpoint

            state_dict = fp8_checkpoint.quantize_state_dict(state_dict, fp8_checkpoint.quantized_weight_names(model))
            config["quantization_config"] = fp8_checkpoint.QUANTIZATION_CONFIG
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_torch_state_dict(state_dict, staging, max_shard_size=max_shard_size)
        for name, content in (extra_files or {}).items():
            target = staging / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def from_pretrained(path_or_repo_id: str | os.PathLike, revision: str | None = None):
    """A :class:`zoo.ZooModel` from a local checkpoint directory written by ``save_pretrained``."""
    from zoo.factory import build_model

    path = Path(path_or_repo_id)
    if not path.is_dir():
        raise NotImplementedError(f"{path_or_repo_id!r} is not a local checkpoint directory; "
                                  "downloads from the Hugging Face Hub are not implemented yet")
    raw = json.loads((path / "config.json").read_text())
    quantization = raw.pop("quantization_config", None)
    model = build_model(ZooConfig.from_dict(raw))
    if quantization is None:
        result = load_torch_model(model, path, strict=False)
    else:  # fp8 weights: dequantised to float32 for use anywhere
        from zoo.fp8.checkpoint import load_fp8_state_dict

        result = model.load_state_dict(load_fp8_state_dict(path, quantization), strict=False)
    missing = [k for k in result.missing_keys if k not in _tied_keys(model)]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {str(path)!r} does not fit its config: missing tensors {missing}, "
                         f"unexpected tensors {result.unexpected_keys}")
    return model


def load_pretrained_for(config: ZooConfig):
    """The preset's pretrained weights from its ``hub.repo_id``."""
    if config.hub.repo_id is None:
        raise ValueError(f"preset {config.name!r} has no hub.repo_id, so it has no pretrained weights")
    return from_pretrained(config.hub.repo_id)


def _tied_keys(model) -> set[str]:
    return {"head.weight"} if model.config.model.tie_embeddings else set()


def _untied_state_dict(model) -> dict:
    """The state dict with each tied weight stored once (under its embedding's name)."""
    return {k: v for k, v in model.state_dict().items() if k not in _tied_keys(model)}


def _replace_dir(staging: Path, path: Path) -> None:
    if path.exists():
        retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, path)
