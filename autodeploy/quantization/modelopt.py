"""NVIDIA ModelOpt FP8 checkpoints (hf_quant_config.json, or quant_method 'modelopt'; what TensorRT-LLM reads).

Published layout: per quantized linear, weight e4m3 [N, K], weight_scale float32 (a scalar for
quant_algo FP8; [N] or [N, 1] for FP8_PER_CHANNEL_PER_TOKEN) and, for FP8, a static per-tensor
input_scale; `exclude_modules` lists the modules kept unquantized (their tensors say so as well).
"""

from __future__ import annotations

from functools import partial

from .checkpoint import CheckpointFormat, unsupported
from .compressed_tensors import build_fp8
from .loading import LayerLoad
from .schemes import LinearScheme

_ALGOS = {"FP8": LinearScheme("fp8", per_channel=False, static_input=True),
          "FP8_PER_CHANNEL_PER_TOKEN": LinearScheme("fp8", per_channel=True, act_quant="token")}


class ModelOptFormat(CheckpointFormat):
    method = "modelopt"

    def scheme_for(self, path: str) -> LinearScheme | None:
        if f"{path}.weight_scale" not in self.keys:
            return None
        algo = str(self.config.get("quant_algo"))
        if algo not in _ALGOS:
            raise unsupported("modelopt", f"quant_algo {algo}")
        return _ALGOS[algo]

    def layer_load(self, path, scheme, out_features, in_features, scale_dtype, params) -> LayerLoad:
        sources = {f"{path}.weight": (out_features, in_features), f"{path}.weight_scale": None}
        if scheme.static_input:
            sources[f"{path}.input_scale"] = None
        return LayerLoad(sources, partial(build_fp8, path, scheme), params)
