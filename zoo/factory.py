"""Models by preset name, config path or config: the user's entry points above every layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from zoo.checkpoint.hub import HUB_PREFIX
from zoo.checkpoint.pretrained import load_hub_model, load_pretrained
from zoo.model import ModelConfig, ZooModel
from zoo.model import build_model as build_from_model_config
from zoo.train.config import ZooConfig, list_presets, load_config
from zoo.schema import parse_overrides


def list_models(pattern: str = "*") -> list[str]:
    """Sorted preset names (stems of ``zoo_configs/*.yaml``) matching a glob ``pattern``."""
    return list_presets(pattern)


def build_model(config: ZooConfig | ModelConfig) -> ZooModel:
    """An initialised :class:`ZooModel` for a validated run config (its ``model`` section is used) or model
    config (see :func:`zoo.load_config`)."""
    return build_from_model_config(config.model if isinstance(config, ZooConfig) else config)


def create_model(name_or_path: str | Path | ZooConfig, pretrained: bool = False,
                 overrides: Sequence[str] | Mapping[str, Any] | None = None, *, revision: str | None = None,
                 token: str | None = None, drop_mtp: bool = False, **model_fields) -> ZooModel:
    """A model from a preset name or config path, with dotted ``overrides`` and ``model.*`` keywords.

    ``create_model("switch-tiny", n_layers=2)`` sets ``model.n_layers``; a dict keyword merges into
    the section (``mixer={"n_heads": 4}``). ``pretrained=True`` loads the preset's Hub weights;
    ``"hf-hub:org/repo"`` names a Hub repo instead of a preset (its weights are always loaded).
    ``revision``, ``token`` and ``drop_mtp`` apply to those downloads as in :func:`zoo.from_pretrained`.
    """
    merged = dict(parse_overrides(overrides))
    merged.update({f"model.{key}": value for key, value in model_fields.items()})
    if isinstance(name_or_path, str) and name_or_path.startswith(HUB_PREFIX):
        # A checkpoint holds the model section only: train.* / hub.* overrides are checked, then unused.
        model_overrides = {key: value for key, value in merged.items() if key.split(".")[0] == "model"}
        load_config({}, {key: value for key, value in merged.items() if key not in model_overrides})
        return load_hub_model(name_or_path, model_overrides, revision=revision, token=token, drop_mtp=drop_mtp)
    config = load_config(name_or_path, merged)
    if pretrained:
        if config.hub.repo_id is None:
            raise ValueError(f"preset {config.name!r} has no hub.repo_id, so it has no pretrained weights")
        return load_pretrained(config.hub.repo_id, config.model, revision, token=token, drop_mtp=drop_mtp)
    if revision is not None or token is not None or drop_mtp:
        raise ValueError("revision, token and drop_mtp apply to downloaded weights: pass pretrained=True "
                         "or an 'hf-hub:' name")
    return build_model(config)
