"""The recipe's `quantization:` section (also set by `LLM(quantization=...)` and `--quantization`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

from autodeploy.errors import QuantizationError

ALGOS = ("auto", "none", "fp8", "int8", "int4")  # auto: what the checkpoint says, else unquantized
KV_CACHE_DTYPES = ("auto", "fp8")
ACT_QUANTS = ("token", "tensor", "group")
# group_size unset: a linear gets the first of these that divides its in_features. int8 is per channel
# (what vLLM / TensorRT-LLM W8A16 checkpoints hold), int4 group 128 (GPTQ / AWQ / llm-compressor's W4A16),
# falling back to 64 / 32 for the linears 128 does not divide (SmolLM2's 576 columns) with a warning.
DEFAULT_GROUP_SIZES = {"int4": (128, 64, 32), "int8": (-1,)}
_DIVISOR_HINTS = (16, 32, 64, 128, 256)


@dataclass
class QuantizationSettings:
    algo: str = "auto"
    group_size: Optional[int] = None  # int4 / int8 columns per scale; -1 = one per output channel; None: the default
    symmetric: bool = False  # int4 / int8: implicit zero point, else a (fractional) zero point per group
    exclude: list = field(default_factory=lambda: ["lm_head", "*router*", "*.gate"])  # module-path globs kept as is
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8: e4m3 with per-layer scales (checkpoint's, else 1.0)
    # fp8 dynamic activation scales: per token and group of act_group_size columns (the last group short where
    # it does not divide in_features; DeepSeek-V3 / vLLM's per-token-group FP8) | per token | per tensor
    act_quant: str = "group"
    act_group_size: int = 128
    scale_search: bool = True  # online: scales fitted to each weight (scale_search.py), else round-to-nearest
    # fp8 online: one weight scale per weight_block_size x weight_block_size tile (DeepSeek-V3 / Qwen3-FP8's
    # weights; vLLM's `weight_block_size`; round-to-nearest) instead of one per output channel; 0: per channel.
    # The activations' groups must be as wide (act_quant group, act_group_size the same).
    weight_block_size: int = 0

    def __post_init__(self):
        for key, value, valid in (("algo", self.algo, ALGOS), ("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES),
                                  ("act_quant", self.act_quant, ACT_QUANTS)):
            if value not in valid:
                raise QuantizationError(f"unknown quantization {key} '{value}' (supported: {', '.join(valid)})")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise QuantizationError(f"quantization group_size must be positive or -1, not {self.group_size}")
        if self.act_group_size < 16 or self.act_group_size & (self.act_group_size - 1):
            raise QuantizationError(f"quantization act_group_size must be a power of two >= 16 (the kernels' K tiles "
                                    f"divide it), not {self.act_group_size}")
        if self.weight_block_size and (self.act_quant != "group" or self.weight_block_size != self.act_group_size):
            raise QuantizationError(f"quantization weight_block_size {self.weight_block_size} needs act_quant group "
                                    f"with act_group_size {self.weight_block_size} (got {self.act_quant}, "
                                    f"{self.act_group_size}): the GEMM applies both scales per K group")

    @property
    def online(self) -> bool:
        """Whether an unquantized checkpoint is to be quantized while it loads."""
        return self.algo in ("fp8", "int8", "int4")

    def excluded(self, module_path: str) -> bool:
        return any(fnmatchcase(module_path, pattern) for pattern in self.exclude)

    @property
    def nominal_group_size(self) -> int | None:
        """The group size asked for: the explicit one, else the algo's default (None for fp8 and no algo)."""
        if self.group_size is not None or self.algo not in DEFAULT_GROUP_SIZES:
            return self.group_size
        return DEFAULT_GROUP_SIZES[self.algo][0]

    def group_size_for(self, in_features: int, name: str) -> int:
        """The group size of the linear `name`: the explicit one, which must divide in_features, else the
        first default that does (nominal_group_size unless it had to fall back). Errors name the linear."""
        if self.group_size is not None:
            if self.group_size != -1 and in_features % self.group_size:
                fitting = ", ".join(str(g) for g in _DIVISOR_HINTS if in_features % g == 0)
                raise QuantizationError(
                    f"group size {self.group_size} does not divide in_features {in_features} of {name} (group sizes "
                    f"that do: {fitting + ', ' if fitting else ''}or -1 for one scale per output channel)")
            return self.group_size
        defaults = DEFAULT_GROUP_SIZES[self.algo]
        for group in defaults:
            if group == -1 or in_features % group == 0:
                return group
        raise QuantizationError(
            f"none of the default {self.algo} group sizes ({', '.join(map(str, defaults))}) divides in_features "
            f"{in_features} of {name}: set quantization.group_size (-1: one scale per output channel)")
