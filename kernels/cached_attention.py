"""Paged attention over a packed batch: `torch.ops.autodeploy.cached_attention` (+ a Triton backend).

After the `insert_kv_cache` transform, one forward holds the new tokens of many sequences in one
dimension (prefill chunks and single decode tokens mixed). Every other op is token-wise; this op is
the one that knows where sequences start and end. It first writes the new keys/values into the
paged cache through `slot_mapping`, then lets each query token attend, causally, over its
sequence's whole cached context (earlier steps' tokens and this step's), found via `block_tables`.

Layout (HF layout after the transpose, batch dim 1 because the batch is packed):
  q            [1, n_heads, T, d]        k, v  [1, n_kv_heads, T, d]   (T = all new tokens)
  k/v_cache    [num_blocks, block_size, n_kv_heads, d]
  cu_seqlens   int32 [B + 1]   new-token offsets of each sequence in T
  seq_lens     int32 [B]       each sequence's context length including this step's tokens
  block_tables int32 [B, max_blocks]   cache blocks of each sequence, in order
  slot_mapping int64 [T]       flat cache slot (block * block_size + offset) of each new token
Query token i of sequence b (local index j) sits at context position seq_lens[b] - q_len_b + j and
sees keys at positions <= that one (and, with a sliding window W, > that one - W, as in HF); with
ALiBi slopes [n_heads], score += slope_h * (key position - query position); with sinks [n_heads] each
row's softmax denominator also holds exp(sink of its head) (`attention`'s `softmax_with_sinks`).
Output: [1, n_heads, T, d], like the canonical `attention` op it replaces.

FP8 KV cache: a float8_e4m3fn cache stores k / k_scale and v / v_scale, saturated to +-448, and is
read as cache * scale (the scales are per layer, floats: the checkpoint's when it has them, else 1.0,
vLLM's default: bf16 keys and values of usual models lie well inside e4m3's range). Half the bytes of
bf16, so the pool holds twice the tokens. Any other cache dtype ignores the scales.

RoPE inside (`fuse_rope_attention`): with rope_cos / rope_sin (HF's cos and sin, broadcastable against q)
the op first rotates q and k exactly as `autodeploy::rope` does (rotate-half, or interleaved pairs), so the cache
holds rotated keys as before; the decode kernel rotates them where it loads q and stores the new k, which saves
the RoPE launch of every layer.

`cached_attention` is the plain-torch reference (ground truth, CPU); `cached_attention_triton`
has the same signature and semantics and is selected by the transform's `backend` setting.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quant_format import FP8_DTYPE, FP8_MAX
from .attention import alibi_bias, softmax_with_sinks
from .rope import rope

_MUTATES = ("k_cache", "v_cache")


def to_cache(new: Tensor, cache: Tensor, scale: float) -> Tensor:
    """Values as the cache stores them: divided by the scale and saturated for an fp8 cache, else cast."""
    if cache.dtype == FP8_DTYPE:
        return (new.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return new.to(cache.dtype)


def from_cache(cached: Tensor, scale: float) -> Tensor:
    """Cached values in float32: times the scale for an fp8 cache."""
    return cached.float() * scale if cached.dtype == FP8_DTYPE else cached.float()


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter this step's keys/values ([1, n_kv, T, d]) into their cache slots."""
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        values = to_cache(new[0].transpose(0, 1), cache, scale)
        if cache.dtype == FP8_DTYPE:  # index_copy_ has no fp8 kernel on CPU: copy the bytes
            cache, values = cache.view(torch.uint8), values.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, values)


def allowed_keys(q_pos: Tensor, num_keys: int, sliding_window: int | None) -> Tensor:
    """Mask [len(q_pos), num_keys]: causal, and inside the sliding window when there is one."""
    k_pos = torch.arange(num_keys, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= q_pos[:, None] - k_pos[None, :] < sliding_window
    return allowed


def _output_like(q: Tensor, v: Tensor) -> Tensor:
    """[1, n_heads, T, d_v]: the value head dim may differ from q/k's (DeepSeek MLA)."""
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _check(q: Tensor, k: Tensor, k_cache: Tensor) -> None:
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"cached_attention takes a packed batch (batch dim 1), got q {tuple(q.shape)}")
    if q.shape[1] % k.shape[1] or k.shape[1] != k_cache.shape[2]:
        raise ValueError(f"head counts do not fit: q {q.shape[1]}, k {k.shape[1]}, cache {k_cache.shape[2]}")


@torch.library.custom_op("autodeploy::cached_attention", mutates_args=_MUTATES)
def cached_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    cu_seqlens: Tensor, seq_lens: Tensor, block_tables: Tensor, slot_mapping: Tensor,
    scale: float, sliding_window: int | None = None, logit_cap: float | None = None,
    alibi_slopes: Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
    rope_cos: Tensor | None = None, rope_sin: Tensor | None = None, rope_interleaved: bool = False,
    sinks: Tensor | None = None,
) -> Tensor:
    """Reference: rotate q and k (with rope_cos), write the cache, then per sequence gather its context and
    attend in float32."""
    _check(q, k, k_cache)
    if rope_cos is not None:
        q, k = rope(q, rope_cos, rope_sin, rope_interleaved), rope(k, rope_cos, rope_sin, rope_interleaved)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    n_heads, n_kv, block_size = q.shape[1], k.shape[1], k_cache.shape[1]
    out = _output_like(q, v)
    starts, lens = cu_seqlens.tolist(), seq_lens.tolist()
    for b, ctx in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        blocks = block_tables[b, : -(-ctx // block_size)].long()
        keys = from_cache(k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1), k_scale)  # [n_kv, ctx, d]
        values = from_cache(v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1), v_scale)
        keys = keys.repeat_interleave(n_heads // n_kv, dim=0)
        values = values.repeat_interleave(n_heads // n_kv, dim=0)
        scores = q[0, :, start:end].float() @ keys.transpose(1, 2) * scale  # [n_heads, q_len, ctx]
        if logit_cap is not None:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        if alibi_slopes is not None:
            scores = scores + alibi_bias(alibi_slopes, q_pos, torch.arange(ctx, device=q.device))
        scores = scores.masked_fill(~allowed_keys(q_pos, ctx, sliding_window), float("-inf"))
        out[0, :, start:end] = (softmax_with_sinks(scores, sinks) @ values).to(q.dtype)
    return out


@torch.library.custom_op("autodeploy::cached_attention_triton", mutates_args=_MUTATES)
def cached_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    cu_seqlens: Tensor, seq_lens: Tensor, block_tables: Tensor, slot_mapping: Tensor,
    scale: float, sliding_window: int | None = None, logit_cap: float | None = None,
    alibi_slopes: Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
    rope_cos: Tensor | None = None, rope_sin: Tensor | None = None, rope_interleaved: bool = False,
    sinks: Tensor | None = None,
) -> Tensor:
    """Triton backend (same contract). The kernel module is imported on first use, because
    `triton.jit` decides at decoration time whether to interpret (TRITON_INTERPRET=1 on CPU)."""
    return triton_attention(q, k, v, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, slot_mapping, scale,
                            sliding_window, logit_cap, alibi_slopes, k_scale, v_scale, rope_cos, rope_sin,
                            rope_interleaved, sinks)


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    cu_seqlens: Tensor, seq_lens: Tensor, block_tables: Tensor, slot_mapping: Tensor,
    scale: float, sliding_window: int | None, logit_cap: float | None, alibi_slopes: Tensor | None,
    k_scale: float, v_scale: float, rope_cos: Tensor | None, rope_sin: Tensor | None, rope_interleaved: bool,
    sinks: Tensor | None = None, quant_group: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`cached_attention_triton`'s work; with `quant_group` the output [1, T, n_heads * d] quantized per token and
    group (quantize_fp8_per_token's (e4m3, scales)): in the decode kernel's epilogue, else by the quantize kernel."""
    from .triton_cached_attention import paged_attention
    from .triton_decode_attention import decode_attention, rope_rows, write_kv_cache as triton_write_kv_cache
    from .triton_rope import rope_pair

    _check(q, k, k_cache)
    decode = q.shape[2] == seq_lens.shape[0]
    rotation = rope_rows(q, rope_cos, rope_sin, rope_interleaved) if decode and rope_cos is not None else None
    if decode and (rope_cos is None or rotation is not None):
        # Decode-only step: every sequence has exactly one new token (a chunk is never empty), so
        # T == B decides it from shapes alone - fixed when a CUDA graph is captured. The decode
        # kernel also rotates q and k and writes the new k/v into the cache.
        return decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, sliding_window, logit_cap,
                                alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
                                k=k, v=v, slot_mapping=slot_mapping, rope=rotation, quant_group=quant_group,
                                sinks=sinks)
    if rope_cos is not None:
        q, k = rope_pair(q, k, rope_cos, rope_sin, rope_interleaved)
    triton_write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    out = paged_attention(q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, scale, sliding_window, logit_cap,
                          alibi_slopes, k_scale, v_scale, sinks=sinks)
    if quant_group is None:
        return out
    from .triton_fp8_act_quant import quantize_fp8_per_token

    return quantize_fp8_per_token(out.transpose(1, 2).reshape(1, out.shape[2], -1), quant_group)


def _fake(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens: Tensor, seq_lens: Tensor,
          block_tables: Tensor, slot_mapping: Tensor, scale: float, sliding_window: int | None = None,
          logit_cap: float | None = None, alibi_slopes: Tensor | None = None, k_scale: float = 1.0,
          v_scale: float = 1.0, rope_cos: Tensor | None = None, rope_sin: Tensor | None = None,
          rope_interleaved: bool = False, sinks: Tensor | None = None) -> Tensor:
    return _output_like(q, v)


cached_attention.register_fake(_fake)
cached_attention_triton.register_fake(_fake)

CACHED_ATTENTION_BACKENDS = {
    "torch": torch.ops.autodeploy.cached_attention.default,
    "triton": torch.ops.autodeploy.cached_attention_triton.default,
}
