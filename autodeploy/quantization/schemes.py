"""How one linear (or one MoE's experts) is quantized: the parameters it holds and the op that reads them.

A `LinearScheme` is the common currency of the two quantization transforms: checkpoint readers turn
a format's description into one, online quantization builds one from the recipe section, and the
graph rewrite only asks it for parameter shapes and the op call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autodeploy.kernels.quant_format import (FP8_DTYPE, check_bits, groups_of, quantize_fp8, quantize_fp8_blocks,
                                             quantize_int)
from autodeploy.kernels.quant_linear import ACT_GROUP_SIZE

from .scale_search import quantize_fp8_search, quantize_int_search


@dataclass(frozen=True)
class LinearScheme:
    kind: str  # "fp8" (W8A8, kernels: fp8_linear / fp8_moe) or "int" (weight-only, int_linear / int_moe)
    bits: int = 8
    group_size: int = -1  # int: columns per scale, -1 = per output channel
    symmetric: bool = True  # int: implicit zero point 2**(bits-1)
    per_channel: bool = True  # fp8: one weight scale per output channel, else one per tensor
    static_input: bool = False  # fp8: a per-tensor activation scale stored in the checkpoint
    act_quant: str = "token"  # fp8 without a static scale: per token | per token and group of columns | per tensor
    act_group_size: int = ACT_GROUP_SIZE  # fp8, act_quant "group": columns per activation scale
    act_order: bool = False  # int: GPTQ's g_idx (column -> group) is a parameter
    groups: int | None = None  # int act-order on a tensor-parallel slice of K: the whole row's groups (g_idx's range)
    scale_search: bool = False  # online: scales fitted to the weight (scale_search.py) instead of round-to-nearest
    weight_block: int = 0  # fp8: one weight scale per weight_block x weight_block tile (== act_group_size), 0: none

    @property
    def name(self) -> str:
        """What users ask for: fp8, int8 or int4 (the `quantization.algo` values)."""
        return "fp8" if self.kind == "fp8" else f"int{self.bits}"

    def check(self, in_features: int) -> None:
        """A clear error before any weight is read when the layout cannot hold this linear."""
        if self.kind == "int":
            check_bits(self.bits, in_features)
            if self.groups is None:
                groups_of(in_features, self.group_size)

    def params(self, out_features: int, in_features: int, scale_dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
        """Parameter name -> (shape, dtype) of one [out, in] weight in this scheme (the op's layout)."""
        n, k = out_features, in_features
        if self.kind == "fp8":
            b = self.weight_block
            scale = (-(-n // b), -(-k // b)) if b else (n,) if self.per_channel else ()
            params = {"weight": ((n, k), FP8_DTYPE), "weight_scale": (scale, torch.float32)}
            if self.static_input:
                params["input_scale"] = ((), torch.float32)
            return params
        g = groups_of(k, self.group_size) if self.groups is None else self.groups
        params = {"qweight": ((n, k * self.bits // 32), torch.int32), "scales": ((n, g), scale_dtype)}
        if not self.symmetric:
            params["zeros"] = ((n, g), scale_dtype)
        if self.act_order:
            params["g_idx"] = ((k,), torch.int32)
        return params

    def linear_call(self, x, params: dict, bias) -> tuple[object, tuple, dict]:
        """(op, args, kwargs) of the quantized linear reading `params` (name -> graph node)."""
        if self.kind == "fp8":
            kwargs = {"input_scale": params.get("input_scale"), "bias": bias, "act_quant": self.act_quant}
            if self.act_quant == "group":
                kwargs["act_group_size"] = self.act_group_size
            return torch.ops.autodeploy.fp8_linear.default, (x, params["weight"], params["weight_scale"]), kwargs
        return (torch.ops.autodeploy.int_linear.default, (x, params["qweight"], params["scales"]),
                {"zeros": params.get("zeros"), "g_idx": params.get("g_idx"), "bias": bias,
                 "bits": self.bits, "group_size": self.group_size})

    def quantize(self, weight: torch.Tensor, scale_dtype: torch.dtype, combine=None) -> dict[str, torch.Tensor]:
        """A full-precision [out, in] weight quantized into this scheme's params (round-to-nearest, or searched).
        `combine`: fp8 row statistics over every rank's slice of K (a row-parallel shard; int groups lie
        inside one shard and need none)."""
        if self.kind == "fp8" and self.weight_block:
            w, scale = quantize_fp8_blocks(weight, self.weight_block)
            return {"weight": w, "weight_scale": scale}
        if self.kind == "fp8":
            searched = self.scale_search and self.per_channel
            w, scale = (quantize_fp8_search(weight, combine=combine) if searched
                        else quantize_fp8(weight, per_channel=self.per_channel, combine=combine))
            return {"weight": w, "weight_scale": scale}
        quantizer = quantize_int_search if self.scale_search else quantize_int
        qweight, scales, zeros = quantizer(weight.to(scale_dtype), self.bits, self.group_size, self.symmetric)
        out = {"qweight": qweight, "scales": scales.to(scale_dtype)}
        if zeros is not None:
            out["zeros"] = zeros.to(scale_dtype)
        return out


def online_scheme(settings) -> LinearScheme:
    """The scheme `quantization.algo` asks for (fp8: per-channel or block weights, dynamic activations)."""
    if settings.algo == "fp8":
        return LinearScheme("fp8", act_quant=settings.act_quant, act_group_size=settings.act_group_size,
                            scale_search=settings.scale_search and not settings.weight_block_size,
                            weight_block=settings.weight_block_size)
    return LinearScheme("int", bits=int(settings.algo.removeprefix("int")), group_size=settings.group_size,
                        symmetric=settings.symmetric, scale_search=settings.scale_search)
