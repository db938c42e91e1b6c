"""FP8 training and checkpoints (DeepSeek-V3 §3.3; torchao float8; Transformer Engine recipes).

* :mod:`zoo.fp8.quant`: float8 quantisation per tensor / row / 1x128 tile / 128x128 block.
* :mod:`zoo.fp8.linear`: the recipes, the three-GEMM autograd function and :class:`Float8Linear`.
* :mod:`zoo.fp8.convert`: the model transformation applied for ``model.fp8: {recipe: ...}``.
* :mod:`zoo.fp8.checkpoint`: DeepSeek-V3-layout fp8 weights (``weight`` + ``weight_scale_inv``).
"""

from zoo.fp8.convert import DEFAULT_SKIP, FP8Config, Float8Converter, convert_to_float8, skip_patterns_filter
from zoo.fp8.linear import RECIPES, Float8Linear, Recipe, make_recipe
from zoo.fp8.quant import dequantize, quantize

__all__ = ["DEFAULT_SKIP", "FP8Config", "Float8Converter", "RECIPES", "Float8Linear", "Recipe", "convert_to_float8", "dequantize", "make_recipe",
           "quantize", "skip_patterns_filter"]
