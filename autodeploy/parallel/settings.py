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
