"""zoo's own transformers form (``model_type: zoo``, loaded in transformers by :mod:`zoo.interop.hf`).

``config.json`` holds the zoo model config under ``zoo_config`` beside the keys transformers reads; the tensors
are zoo's, under the transformers wrapper's ``model.`` prefix. Importing strips the prefix; exporting
(:func:`zoo.export` with ``format="zoo"``) adds it, so any zoo model (retention, hybrids, Switch) travels
through this form unchanged.
"""

from __future__ import annotations

from zoo.checkpoint.importers.common import HFConfig, Tensors
from zoo.errors import CheckpointError

MODEL_TYPE = "zoo"
CONFIG_KEY = "zoo_config"
PREFIX = "model."


def convert(config: HFConfig, t: Tensors) -> dict:
    for name in list(t.hf):
        if not name.startswith(PREFIX):
            raise CheckpointError(f"{t.source}: tensor {name!r} of a model_type 'zoo' checkpoint lacks the "
                                  f"{PREFIX!r} prefix")
        t.move(name, name[len(PREFIX):])
    return {"model": config.require(CONFIG_KEY)}
