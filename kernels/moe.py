"""`autodeploy::moe`: the routed experts of a mixture-of-experts block, given the routing decision.

    moe(x[T, H], topk_ids[T, K], topk_weights[T, K],
        w_gate_up[E, 2I, H], w_down[E, H, I], activation,
        b_gate_up[E, 2I]?, b_down[E, H]?) -> [T, H]

    out[t] = sum_k topk_weights[t, k] * down_e(act(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, k]

Design choices (and why):
- Routing is *not* part of the op. Routers differ per family (Mixtral: softmax -> top-k ->
  renormalise; Qwen3-MoE: optional renormalise; DeepSeek-V3: sigmoid + correction bias +
  group-limited top-k + scaling factor; GPT-OSS: top-k -> softmax) and are cheap, so they stay
  ordinary graph ops. The op is the expensive, data-dependent part every family shares.
- Expert weights are stacked 3D tensors in HF's fused layout (gate rows first, then up rows; alternating
  rows for an interleaved activation, GPT-OSS's `swigluoai`), as transformers 5 stores them: the graph keeps
  the checkpoint's parameters unchanged, a grouped-GEMM backend consumes them as is, and expert parallelism is
  a slice of dim 0.
- `x` may have leading dims ([..., H]); the output has x's shape and dtype. Accumulation is float32.
Shared experts are not part of the op: they stay ordinary MLPs in the graph.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gated_act import GATED_ACTIVATIONS, gated, split_gate_up

SCHEMA = (
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w_gate_up, Tensor w_down, str activation, "
    "Tensor? b_gate_up=None, Tensor? b_down=None) -> Tensor"
)


@torch.library.custom_op("autodeploy::moe", mutates_args=(), schema=SCHEMA)
def moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: per expert, gather its tokens, run the gated MLP, scatter-add the weighted result."""

    def expert_mlp(expert: int, h: torch.Tensor) -> torch.Tensor:
        def gate_up(h: torch.Tensor) -> torch.Tensor:
            y = h.to(w_gate_up.dtype) @ w_gate_up[expert].t()
            return y + b_gate_up[expert] if b_gate_up is not None else y

        def down(h: torch.Tensor) -> torch.Tensor:
            y = h @ w_down[expert].t()
            return y + b_down[expert] if b_down is not None else y

        return gated_mlp(h, gate_up, down, activation)

    return route_to_experts(x, topk_ids, topk_weights, expert_mlp)


def gated_mlp(h: torch.Tensor, gate_up: Callable, down: Callable, activation: str) -> torch.Tensor:
    """down(act(gate) * up) with [gate; up] = gate_up(h) (alternating for an interleaved activation): one
    expert, whatever its weights' format."""
    return down(gated(*split_gate_up(gate_up(h), activation), activation))


def route_to_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_mlp: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The routing half of every MoE reference (plain and quantized experts): per used expert, gather
    its tokens, `expert_mlp(expert, tokens)`, scatter-add the result weighted, in float32; x's dtype out."""
    tokens = x.reshape(-1, x.shape[-1])
    ids = topk_ids.reshape(tokens.shape[0], -1)
    weights = topk_weights.reshape(tokens.shape[0], -1).float()
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
    for expert in ids.unique().tolist():
        token_idx, slot = torch.where(ids == expert)
        y = expert_mlp(expert, tokens[token_idx])
        out.index_add_(0, token_idx, y.float() * weights[token_idx, slot, None])
    return out.to(x.dtype).reshape(x.shape)


@moe.register_fake
def _(x, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up=None, b_down=None):
    torch._check(activation in GATED_ACTIVATIONS, lambda: f"unknown activation {activation!r}")
    torch._check(w_gate_up.dim() == 3 and w_down.dim() == 3, lambda: "expert weights must be [E, out, in]")
    torch._check(w_gate_up.shape[1] == 2 * w_down.shape[2], lambda: "w_gate_up must be [E, 2I, H], w_down [E, H, I]")
    return torch.empty_like(x)
