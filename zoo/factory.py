"""Building models by preset name, path or config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from zoo.config import ZooConfig, list_presets, load_config, parse_overrides
from zoo.model import ZooModel


def list_models(pattern: str = "*") -> list[str]:
    """Sorted preset names (stems of ``zoo_configs/*.yaml``) matching a glob ``pattern``."""
    return list_presets(pattern)


def build_model(config: ZooConfig) -> ZooModel:
    """An initialised :class:`ZooModel` for a validated config (see :func:`zoo.load_config`)."""
    return ZooModel(config)


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "zeros_", "ones_", "constant_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


def build_skeleton(config: ZooConfig) -> ZooModel:
    """``config``'s model on the meta device, its parameters shapes only, for a checkpoint to fill
    (``load_state_dict(..., assign=True)``). The ``torch.nn.init`` calls of the blocks are skipped while it
    is built: on meta tensors they compute nothing, yet their Python decompositions cost more than reading
    the weights of a 100 M-parameter checkpoint from the page cache."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return ZooModel(config)
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


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
    if isinstance(name_or_path, str) and name_or_path.startswith("hf-hub:"):
        from zoo.hub import load_hub_model

        return load_hub_model(name_or_path, merged, revision=revision, token=token, drop_mtp=drop_mtp)
    config = load_config(name_or_path, merged)
    if pretrained:
        from zoo.hub import load_pretrained_for

        return load_pretrained_for(config, revision, token=token, drop_mtp=drop_mtp)
    if revision is not None or token is not None or drop_mtp:
        raise ValueError("revision, token and drop_mtp apply to downloaded weights: pass pretrained=True "
                         "or an 'hf-hub:' name")
    return build_model(config)
