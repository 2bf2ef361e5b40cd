"""`autodeploy::attention`: causal (optionally sliding-window, soft-capped) GQA attention.

The canonical form every attention pattern is rewritten to. Inputs are in HF's layout after the
head transpose, with K/V *not* repeated for GQA: later transforms (paged KV cache, sharding) must
see the real number of KV heads. Attention sinks (GPT-OSS, Granite-MoE SWA): one learned logit per head
that joins every row's softmax denominator and attends to nothing (`sinks` [n_heads]).
"""

from __future__ import annotations

import torch

SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, float scale, int? sliding_window=None, float? logit_cap=None, "
    "Tensor? alibi_slopes=None, Tensor? sinks=None) -> Tensor"
)


def causal_mask(
    s_q: int, s_k: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [s_q, s_k] mask, True where query i may attend to key j.

    Queries are aligned with the *last* s_q keys (so s_q < s_k means the earlier keys are context).
    The window follows transformers' `sliding_window_overlay`: key j is visible to query i when
    i - sliding_window < j <= i, i.e. a query sees itself and the sliding_window - 1 keys before it.
    """
    i = torch.arange(s_q, device=device).unsqueeze(-1) + (s_k - s_q)
    j = torch.arange(s_k, device=device).unsqueeze(0)
    mask = j <= i
    if sliding_window is not None:
        mask &= j > i - sliding_window
    return mask


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """ALiBi's additive bias [n_heads, len(q_pos), len(k_pos)]: slope_h * (key pos - query pos).

    Models write it as slope_h * key pos (Bloom) or with another per-row offset (MPT); softmax does
    not see a per-row constant, so the relative form is the same attention and needs no absolute origin.
    """
    distance = (k_pos[None, :] - q_pos[:, None]).float()
    return slopes.float()[:, None, None] * distance


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of scores [..., n_heads, s_q, s_k]; with sinks [n_heads] each row's denominator
    also holds exp(sink of its head) (GPT-OSS concatenates the sink as a last key column and drops it after)."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.float()[:, None, None].expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


@torch.library.custom_op("autodeploy::attention", mutates_args=(), schema=SCHEMA)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: q [b, h, s, d], k [b, h_kv, s, d], v [b, h_kv, s, d_v] -> [b, h, s, d_v].

    All math is in float32 (HF upcasts the softmax; a fused kernel accumulates in fp32 anyway), the
    result is cast back to q's dtype. The soft cap, cap * tanh(scores / cap), is applied after the
    scaling and before masking, as Gemma 2 does; the ALiBi bias (per-head slopes [n_heads]) after it.
    """
    n_rep = q.shape[1] // k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(n_rep, dim=1)
    vf = v.float().repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if logit_cap is not None:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if alibi_slopes is not None:
        s_q, s_k = q.shape[2], k.shape[2]
        positions = torch.arange(s_k, device=q.device)
        scores = scores + alibi_bias(alibi_slopes, positions[s_k - s_q:], positions)
    mask = causal_mask(q.shape[2], k.shape[2], sliding_window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(softmax_with_sinks(scores, sinks), vf).to(q.dtype)


@attention.register_fake
def _(q, k, v, scale, sliding_window=None, logit_cap=None, alibi_slopes=None, sinks=None):
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "n_heads must be a multiple of n_kv_heads")
    torch._check(sliding_window is None or sliding_window >= 1, lambda: "sliding_window must be >= 1")
    return q.new_empty(*q.shape[:-1], v.shape[-1])
