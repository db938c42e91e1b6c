"""zoo: Mixture-of-Experts and efficient-architecture language models from interchangeable blocks."""

from zoo.config import ConfigError, ZooConfig, load_config
from zoo.factory import build_model, create_model, list_models
from zoo.hub import from_pretrained
from zoo.model import ZooModel, ZooOutput
from zoo.registry import BlockContext, register
from zoo.registry import available as available_blocks

__all__ = [
    "BlockContext", "ConfigError", "ZooConfig", "ZooModel", "ZooOutput", "available_blocks", "build_model",
    "create_model", "from_pretrained", "list_models", "load_config", "register",
]
__version__ = "0.1.0"
