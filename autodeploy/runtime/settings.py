"""Runtime settings: the recipe's `runtime` section, which `LLM(...)` keywords override.

Plain data with no torch import, so the recipe loader can type-check the section without the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_PREFILL_TOKENS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class EngineSettings:
    max_batch_size: int = 64  # sequences holding KV cache at once
    max_num_tokens: int = 0  # tokens per forward (prefill chunks + decodes); 0 = 8192 on a GPU of >= 70 GiB, else 2048 (<= export.max_seq_len)
    max_seq_len: int = 0  # prompt + output; 0 = the model's limit. Always capped by the cache size.
    seed: int | None = None  # seed of the generator shared by unseeded sampling requests
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before
    # Decode-aware chunking: tokens in a step that also runs decodes, decodes included (0 = no bound).
    # 1024 from the H200 measurement (BENCHMARKS.md, 256 requests of 512-2048 prompt tokens, 8B): ITL
    # p90 / p99 69 / 132 ms -> 48 / 79 ms for -0.5 % output tok/s; 512 gives 30 / 42 ms for -9 %.
    max_prefill_tokens_with_decodes: int = 1024
    # CUDA graphs (CUDA only): decode batch sizes and prefill token counts captured; () = none.
    cuda_graph_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    cuda_graph_prefill_tokens: tuple[int, ...] = DEFAULT_PREFILL_TOKENS

    def __post_init__(self) -> None:
        """Checked here, where both the recipe's section and LLM(...) keywords (dataclasses.replace) pass."""
        least = {"max_batch_size": 1, "max_num_tokens": 0, "max_seq_len": 0, "max_prefill_tokens_with_decodes": 0}
        for name, low in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecipeError(f"runtime.{name} must be an integer >= {low}, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise RecipeError(f"runtime.seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("cuda_graph_batch_sizes", "cuda_graph_prefill_tokens"):
            sizes = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
                raise RecipeError(f"runtime.{name} must hold integers >= 1, got {list(sizes)!r}")
