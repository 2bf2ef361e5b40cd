"""compressed-tensors checkpoints (what llm-compressor writes and vLLM reads).

Layouts read as stored: `float-quantized` FP8 (weight e4m3 [N, K], weight_scale [1] per tensor,
[N, 1] per channel or [N / B, K / B] per B x B block (`block` strategy, with dynamic activation groups of B),
input_scale [1] when activations are static) and `pack-quantized` INT4 / INT8
(weight_packed int32 [N, K*bits/32], codes packed along K with an offset of 2**(bits-1), which is
already the canonical layout; weight_scale [N, G]; weight_g_idx [K] with act-order; asymmetric
(`symmetric: false`) adds weight_zero_point int32 [ceil(N*bits/32), G]: zero points packed the same
way but along N, offset too, so unpacked they are zero points in code units, as the canonical zeros).
"""

from __future__ import annotations

import re
from functools import partial

import torch

from autodeploy.errors import QuantizationError
from autodeploy.kernels.quant_format import groups_of, unpack_int

from .checkpoint import CheckpointFormat, unsupported
from .loading import LayerLoad
from .schemes import LinearScheme


def _targets(group: dict, path: str) -> bool:
    """A config group's targets: class names (our linears are all Linear), `re:` regexes, or names."""
    for target in group.get("targets", []):
        if target == "Linear" or target == path or (target.startswith("re:") and re.match(target[3:], path)):
            return True
    return False


def _scheme(group: dict, fmt: str) -> LinearScheme:
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if kind == "float" and bits == 8 and strategy in ("tensor", "channel") and acts:
        if acts.get("type") != "float" or acts.get("num_bits") != 8 or acts.get("strategy") not in ("tensor", "token"):
            raise unsupported("compressed-tensors", f"FP8 weights with {acts.get('type')}{acts.get('num_bits')} "
                              f"{acts.get('strategy')} activations")
        dynamic = bool(acts.get("dynamic"))
        return LinearScheme("fp8", per_channel=strategy == "channel", static_input=not dynamic,
                            act_quant=acts["strategy"] if dynamic else "tensor")
    if kind == "float" and bits == 8 and strategy == "block" and acts:
        return block_fp8_scheme("compressed-tensors", weights.get("block_structure"), acts.get("strategy") == "group"
                                and acts.get("dynamic") and acts.get("type") == "float" and acts.get("num_bits") == 8,
                                acts.get("group_size"))
    if kind == "int" and not acts and fmt == "pack-quantized" and strategy in ("group", "channel"):
        return LinearScheme("int", bits=bits, group_size=weights["group_size"] if strategy == "group" else -1,
                            symmetric=weights.get("symmetric", True), act_order=weights.get("actorder") is not None)
    described = f"{kind}{bits} {strategy} weights" + (f", {acts.get('type')}{acts.get('num_bits')} activations" if acts else "")
    raise unsupported("compressed-tensors", f"{fmt} {described}")


def block_fp8_scheme(method: str, block: list | None, dynamic_groups: bool, group_size: int | None) -> LinearScheme:
    """FP8 weights in square blocks with dynamic activation groups as wide (the GEMM promotes per K group)."""
    if not (block and len(block) == 2 and block[0] == block[1] and block[0] >= 16 and not block[0] & (block[0] - 1)):
        raise unsupported(method, f"FP8 weight blocks {block} (square, a power of two >= 16)")
    if not dynamic_groups or group_size not in (None, block[0]):
        raise unsupported(method, f"FP8 {block[0]} x {block[0]} weight blocks without dynamic activation groups of "
                                  f"{block[0]}")
    return LinearScheme("fp8", act_quant="group", act_group_size=block[0], weight_block=block[0])


def build_fp8(path: str, scheme: LinearScheme, tensors: dict, scale_key: str = "weight_scale") -> dict[str, torch.Tensor]:
    scale = tensors[f"{path}.{scale_key}"].float()
    out = {"weight": tensors[f"{path}.weight"],
           "weight_scale": scale if scheme.weight_block else scale.reshape(-1 if scheme.per_channel else ())}
    if scheme.static_input:
        scale = tensors[f"{path}.input_scale"].float().reshape(())
        if not (torch.isfinite(scale) and scale > 0):  # activations are divided by it
            raise QuantizationError(f"{path}.input_scale must be a positive finite number, got {scale.item()}")
        out["input_scale"] = scale
    return out


def block_scale_shape(scheme: LinearScheme, n: int, k: int) -> tuple[int, int] | None:
    """The stored shape of block weight scales (checked as they load), None for others (stored [1], [N, 1]...)."""
    block = scheme.weight_block
    return (-(-n // block), -(-k // block)) if block else None


def _zeros(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """weight_zero_point int32 [ceil(N*bits/32), G], packed along N -> codes [N, G]."""
    return unpack_int(packed.t(), bits, packed.shape[0] * 32 // bits).t()[:rows]


def _build_int(path: str, scheme: LinearScheme, scale_dtype: torch.dtype, tensors: dict) -> dict[str, torch.Tensor]:
    qweight = tensors[f"{path}.weight_packed"]
    out = {"qweight": qweight, "scales": tensors[f"{path}.weight_scale"].to(scale_dtype)}
    if not scheme.symmetric:
        out["zeros"] = _zeros(tensors[f"{path}.weight_zero_point"], scheme.bits, qweight.shape[0]).to(scale_dtype)
    if f"{path}.weight_g_idx" in tensors:
        out["g_idx"] = tensors[f"{path}.weight_g_idx"].to(torch.int32)
    return out


class CompressedTensorsFormat(CheckpointFormat):
    method = "compressed-tensors"

    def scheme_for(self, path: str) -> LinearScheme | None:
        if f"{path}.weight_scale" not in self.keys:
            return None
        groups = list((self.config.get("config_groups") or {}).values())
        group = next((g for g in groups if _targets(g, path)), groups[0] if groups else {})
        return _scheme(group, group.get("format") or self.config.get("format", ""))

    def layer_load(self, path, scheme, out_features, in_features, scale_dtype, params) -> LayerLoad:
        n, k = out_features, in_features
        if scheme.kind == "fp8":
            sources = {f"{path}.weight": (n, k), f"{path}.weight_scale": block_scale_shape(scheme, n, k)}
            if scheme.static_input:
                sources[f"{path}.input_scale"] = None
            return LayerLoad(sources, partial(build_fp8, path, scheme), params)
        sources = {f"{path}.weight_packed": (n, k * scheme.bits // 32), f"{path}.weight_scale": None}
        if not scheme.symmetric:
            sources[f"{path}.weight_zero_point"] = (-(-n * scheme.bits // 32), groups_of(k, scheme.group_size))
        if scheme.act_order:
            sources[f"{path}.weight_g_idx"] = (k,)
        return LayerLoad(sources, partial(_build_int, path, scheme, scale_dtype), params)
