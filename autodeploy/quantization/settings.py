"""The recipe's `quantization:` section (also set by `LLM(quantization=...)` and `--quantization`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from autodeploy.errors import QuantizationError

ALGOS = ("auto", "none", "fp8", "int8", "int4")  # auto: what the checkpoint says, else unquantized
KV_CACHE_DTYPES = ("auto", "fp8")
ACT_QUANTS = ("token", "tensor")


@dataclass
class QuantizationSettings:
    algo: str = "auto"
    group_size: int = 128  # int4 / int8 columns per scale; -1 = one scale per output channel
    symmetric: bool = False  # int4 / int8: implicit zero point, else a (fractional) zero point per group
    exclude: list = field(default_factory=lambda: ["lm_head", "*router*", "*.gate"])  # module-path globs kept as is
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8: e4m3 with per-layer scales (checkpoint's, else 1.0)
    act_quant: str = "token"  # fp8 dynamic activation scales: per token | per tensor
    scale_search: bool = True  # online: scales fitted to each weight (scale_search.py), else round-to-nearest

    def __post_init__(self):
        for key, value, valid in (("algo", self.algo, ALGOS), ("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES),
                                  ("act_quant", self.act_quant, ACT_QUANTS)):
            if value not in valid:
                raise QuantizationError(f"unknown quantization {key} '{value}' (supported: {', '.join(valid)})")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantizationError(f"quantization group_size must be positive or -1, not {self.group_size}")

    @property
    def online(self) -> bool:
        """Whether an unquantized checkpoint is to be quantized while it loads."""
        return self.algo in ("fp8", "int8", "int4")

    def excluded(self, module_path: str) -> bool:
        return any(fnmatchcase(module_path, pattern) for pattern in self.exclude)
