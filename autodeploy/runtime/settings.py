"""Runtime settings: the recipe's `runtime` section, which `LLM(...)` keywords override.

Plain data with no torch import, so the recipe loader can type-check the section without the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_PREFILL_TOKENS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class EngineSettings:
    max_batch_size: int = 64  # sequences holding KV cache at once
    max_num_tokens: int = 0  # tokens per forward (prefill chunks + decodes); 0 = min(2048, export.max_seq_len)
    max_seq_len: int = 0  # prompt + output; 0 = the model's limit. Always capped by the cache size.
    seed: int | None = None  # seed of the generator shared by unseeded sampling requests
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before
    # Decode-aware chunking: prompt tokens in a step that also runs decodes (0 = max_num_tokens).
    # 512 (reasoned, not yet measured on a GPU): a bf16 forward on an H100/H200 turns compute-bound
    # past ~300 tokens (~300 FLOP per byte of weights read), so a 512-token chunk costs a decode step
    # about 2x a pure decode step, where a full 2048-token chunk costs it several times that.
    max_prefill_tokens_with_decodes: int = 512
    # CUDA graphs (CUDA only): decode batch sizes and prefill token counts captured; () = none.
    cuda_graph_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    cuda_graph_prefill_tokens: tuple[int, ...] = DEFAULT_PREFILL_TOKENS
