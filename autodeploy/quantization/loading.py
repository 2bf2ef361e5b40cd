"""Quantized parameters that `load_weights` builds from other checkpoint tensors, one layer at a time.

The quantization transforms leave placeholders on the meta device and record here, per parameter,
which checkpoint tensors it comes from and how. `load_weights` reads those tensors through its own
reader (so a tensor-parallel slice is taken first, then quantized), builds a layer's parameters
together and hands each out once: the full-precision weight lives only while its layer is built,
so peak memory is the quantized model plus about one tensor.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule

from autodeploy.errors import WeightLoadingError

# read(checkpoint key, expected shape) -> tensor as stored (the caller's reader: checkpoint, or random init)
Reader = Callable[[str, tuple], torch.Tensor]
_META_KEY = "autodeploy_quantized_loads"


class LayerLoad:
    """The parameters of one quantized layer, built together from `sources` by `build`."""

    def __init__(self, sources: dict[str, tuple], build: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 params: dict[str, str]):
        self.sources = sources  # checkpoint key -> expected shape (None: any, e.g. a scale stored [1] or [])
        self.build = build  # {key: tensor} -> {param suffix: tensor}
        self.params = params  # graph parameter name -> param suffix
        self._built: dict[str, torch.Tensor] | None = None

    def take(self, name: str, read: Reader, device: torch.device) -> torch.Tensor:
        if self._built is None:
            tensors = {}
            for key, shape in self.sources.items():
                tensors[key] = read(key, shape).to(device)
                if shape is not None and tuple(tensors[key].shape) != tuple(shape):
                    raise WeightLoadingError(f"{key}: checkpoint shape {tuple(tensors[key].shape)} != expected {tuple(shape)}")
            self._built = self.build(tensors)
            del tensors
        return self._built.pop(self.params[name])


class QuantizedLoads(dict):
    """Graph parameter name -> the LayerLoad that builds it."""

    def add(self, layer: LayerLoad) -> None:
        for name in layer.params:
            self[name] = layer

    def take(self, name: str, read: Reader, device: torch.device) -> torch.Tensor:
        """Parameter `name`, its layer built on first use from tensors `read` returns."""
        return self[name].take(name, read, device)

    def source_keys(self) -> list[str]:
        return list(dict.fromkeys(key for layer in self.values() for key in layer.sources))


def quantized_loads(gm: GraphModule) -> QuantizedLoads:
    """The loads recorded on `gm` (an empty mapping for an unquantized graph)."""
    return gm.meta.setdefault(_META_KEY, QuantizedLoads())
