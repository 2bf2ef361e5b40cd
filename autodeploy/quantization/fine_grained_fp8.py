"""transformers' fine-grained FP8 checkpoints (quant_method 'fp8': Qwen3-*-FP8, DeepSeek-V3, what
`FineGrainedFP8Config` writes).

Published layout: per quantized linear, weight e4m3 [N, K] and weight_scale_inv float32 [N / B, K / B] (the
multiplier of each B x B block, `weight_block_size` [B, B] in the config; the name says it is the inverse of the
quantizing scale), activations quantized dynamically per token and group of B columns (`activation_scheme`
dynamic). `modules_to_not_convert` lists the modules kept unquantized (their tensors say so as well).
"""

from __future__ import annotations

from functools import partial

from .checkpoint import CheckpointFormat, unsupported
from .compressed_tensors import block_fp8_scheme, block_scale_shape, build_fp8
from .loading import LayerLoad
from .schemes import LinearScheme


class FineGrainedFp8Format(CheckpointFormat):
    method = "fp8"

    def scheme_for(self, path: str) -> LinearScheme | None:
        if f"{path}.weight_scale_inv" not in self.keys:
            return None
        if self.config.get("weight_block_size") is None:
            raise unsupported("fp8", "per-tensor checkpoints (without weight_block_size)")
        return block_fp8_scheme("fp8", list(self.config["weight_block_size"]),
                                self.config.get("activation_scheme", "dynamic") == "dynamic", None)

    def layer_load(self, path, scheme, out_features, in_features, scale_dtype, params) -> LayerLoad:
        sources = {f"{path}.weight": (out_features, in_features),
                   f"{path}.weight_scale_inv": block_scale_shape(scheme, out_features, in_features)}
        return LayerLoad(sources, partial(build_fp8, path, scheme, scale_key="weight_scale_inv"), params)
