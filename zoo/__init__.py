"""zoo: Mixture-of-Experts and efficient-architecture language models from interchangeable blocks.

Layers, bottom to top (a module imports only from its own layer or below): :mod:`zoo.errors`,
:mod:`zoo.registry`, :mod:`zoo.schema` -> :mod:`zoo.blocks` (and :mod:`zoo.fp8`) -> :mod:`zoo.model` ->
:mod:`zoo.checkpoint` -> :mod:`zoo.train` -> :mod:`zoo.factory` and this face. Importing the package
imports every built-in block, dispatcher, converter and objective, which registers them.
"""

from zoo import adapters, blocks, fp8  # noqa: F401  (registers the built-in blocks, the fp8 converter, the adapters)
from zoo.adapters import add_adapter
from zoo.blocks.state import DecodingState
from zoo.checkpoint.pretrained import from_pretrained
from zoo.errors import CheckpointError, ConfigError
from zoo.factory import build_model, create_model, list_models
from zoo.model import ModelConfig, ZooModel, ZooOutput
from zoo.registry import BlockContext, register
from zoo.registry import available as available_blocks
from zoo.train import finetune, objectives  # noqa: F401  (registers the built-in objectives)
from zoo.train.config import ZooConfig, load_config

__all__ = [
    "BlockContext", "CheckpointError", "add_adapter", "ConfigError", "DecodingState", "ModelConfig", "ZooConfig", "ZooModel",
    "ZooOutput", "available_blocks", "build_model", "create_model", "from_pretrained", "list_models", "load_config",
    "register",
]
__version__ = "0.2.0"
