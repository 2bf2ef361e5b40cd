"""The recipe section `parallel`: how many ranks share the model and which one this process is.

Plain data (no torch import) so the recipe loader can type-check it without the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelSettings:
    tensor_parallel_size: int = 1  # ranks the model is sharded over (heads, MLP columns, experts)
    enable_expert_parallel: bool = False  # MoE: each rank owns whole experts (else TP inside every expert)
    rank: int = -1  # this process's rank; -1 = torch.distributed's rank (0 when not initialised)
    # Embedding and LM head split by vocabulary rows (the logits gathered for the sampler) or replicated.
    # auto = replicated until GPU runs measure which is faster (benchmarks/tp_bench.py compares both).
    vocab_parallel: str = "auto"  # auto | true | false

    def __post_init__(self):
        from autodeploy.errors import ShardingError

        self.vocab_parallel = str(self.vocab_parallel).lower()  # a YAML / command-line true arrives as a bool
        if self.vocab_parallel not in ("auto", "true", "false"):
            raise ShardingError(f"parallel.vocab_parallel must be auto, true or false, not {self.vocab_parallel!r}")

    @property
    def split_vocab(self) -> bool:
        """Whether the embedding and LM head are split by vocabulary (auto: replicated for now)."""
        return self.vocab_parallel == "true"




def head_counts(config) -> tuple[int, int] | None:
    """(query heads, key/value heads) of an HF text config, None when it has no attention heads."""
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        return None
    kv = getattr(config, "num_key_value_heads", None)
    if kv is None and getattr(config, "multi_query", False):  # Falcon's multi-query flag
        kv = 1
    return heads, kv or getattr(config, "num_kv_heads", None) or heads


def check_head_counts(heads: int, kv_heads: int, world: int) -> None:
    """Query heads must split evenly; KV heads must split evenly or be replicated whole."""
    from autodeploy.errors import ShardingError

    def works(n: int) -> bool:
        return heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)

    if not works(world):
        sizes = ", ".join(str(n) for n in range(1, heads + 1) if works(n))
        raise ShardingError(
            f"tensor_parallel_size {world} does not divide the model's heads ({heads} query heads, "
            f"{kv_heads} key/value heads); sizes that work: {sizes}")
