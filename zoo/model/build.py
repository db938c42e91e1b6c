"""Building a model from its config: construct, initialise, convert.

:func:`build_model` constructs the modules, fills the parameters by the init pass
(:func:`init_weights`) and then applies the converters the config names (``model.fp8``, ``model.converters``), in that order, so
a converter sees initialised weights. :func:`build_skeleton` constructs on the meta device only, for a
checkpoint to fill.
"""

from __future__ import annotations

import torch

from zoo import registry
from zoo.model.config import ModelConfig
from zoo.model.decoder import ZooModel

_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "zeros_", "ones_", "constant_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


def init_weights(model: ZooModel) -> ZooModel:
    """The init pass: the embedding and an untied head drawn from ``N(0, init_std)``."""
    config = model.config
    with torch.no_grad():
        torch.nn.init.normal_(model.embed.weight, std=config.init_std)
        if not config.tie_embeddings:
            torch.nn.init.normal_(model.head.weight, std=config.init_std)
    return model


def apply_converters(model: ZooModel) -> ZooModel:
    """Apply the converters ``model.config`` names (:meth:`ModelConfig.converter_specs`), in order. A converter
    is registered under the kind ``converter`` with its options dataclass; ``Converter(options).convert(model)``
    transforms the model (in place or not) and returns it."""
    for spec in model.config.converter_specs():
        model = registry.lookup("converter", spec.type).block(spec.options).convert(model)
    return model


def build_model(config: ModelConfig) -> ZooModel:
    """An initialised :class:`ZooModel` for a validated model config, its converters applied."""
    return apply_converters(init_weights(ZooModel(config)))


def build_skeleton(config: ModelConfig) -> ZooModel:
    """``config``'s model on the meta device, its parameters shapes only, for a checkpoint to fill
    (``load_state_dict(..., assign=True)``). The ``torch.nn.init`` calls of the blocks are skipped while it
    is built: on meta tensors they compute nothing."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return ZooModel(config)
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
