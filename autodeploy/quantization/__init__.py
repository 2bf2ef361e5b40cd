"""Quantization: the recipe section, linear schemes, checkpoint format readers and quantized weight loading.

The graph side lives in transforms/quantize_linear.py and transforms/quantize_from_checkpoint.py;
this package holds what they share, so `load_weights` only asks `quantized_loads(gm)` which of its
tensors to build from other checkpoint tensors.
"""

from .settings import ALGOS, QuantizationSettings

__all__ = ["ALGOS", "QuantizationSettings"]
