"""The model layer: the model config, the decoder, multi-token prediction, losses, generation, building.

Imports blocks (and the FP8 converter) only; the checkpoint and training layers sit above it.
"""

from zoo.model.build import build_model, build_skeleton, init_weights, materialize
from zoo.model.config import LayerOverride, ModelConfig, MTPConfig
from zoo.model.decoder import ZooModel, ZooOutput

__all__ = ["LayerOverride", "MTPConfig", "ModelConfig", "ZooModel", "ZooOutput", "build_model", "build_skeleton",
           "init_weights", "materialize"]
