"""Triton kernel for paged attention over a packed batch (the `cached_attention_triton` backend).

Prefill chunks and mixed batches (decode-only steps take kernels/triton_decode_attention.py). One program per
(query tile of one sequence, KV head): a tile's BLOCK_M rows are the PACK query heads that share the KV head
times BLOCK_M / PACK tokens, so each key and value tile is read once for its whole group (GQA). Sequences' query
tiles are numbered consecutively: sequence b owns tiles starting at cu_seqlens[b] // (BLOCK_M / PACK) + b, so the
grid is known from shapes alone (no host sync for the longest prompt) and each program finds its sequence by
counting tile starts. Keys are gathered through the block table per key, so any page size works. Online softmax in
float32; key tiles that every row of the tile sees whole skip the causal mask. Imported lazily: `triton.jit`
fixes interpreter vs compiled mode when it decorates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_format import FP8_DTYPE
from .triton_layout import token_major_output
from .triton_pdl import pdl_launch, wait_for_inputs

# (BLOCK_M, BLOCK_N, warps, stages): on an H200 with Llama-3.1-8B's heads (4 query heads packed per KV head, page 32)
# the best or within 6 % of it for one 4,096-token prompt (0.551 ms a layer; torch SDPA on contiguous K/V 0.260, the
# first kernel's 16-query tiles 1.938), 16 x 128 and 1 x 512 tokens; 4 x 1,024 best with 3 stages (0.181 against
# 0.242; BENCHMARKS.md session 18).
KNOBS = (128, 32, 8, 2)
MIN_TILE_TOKENS = 8  # query heads pack into a tile only while it keeps this many tokens


@triton.jit
def _kv_tile(kv, offs_n, dtype, FP8: tl.constexpr):
    """Keys and values of positions offs_n (zeros from key_end), gathered through the sequence's block table; an
    fp8 cache's converted to q's dtype (its scales are folded into the softmax scale and the output). kv: the caches,
    the sequence's block table row, key_end, the KV head, the page size, the head-dim offsets and masks, strides."""
    (k_cache_ptr, v_cache_ptr, table, key_end, kv_head, page_size, offs_d, d_valid, offs_dv, dv_valid, stride_cb,
     stride_cs, stride_ch, stride_cd, stride_vb, stride_vs, stride_vh, stride_vd) = kv
    n_valid = offs_n < key_end
    row = tl.load(table + offs_n // page_size, mask=n_valid, other=0).to(tl.int64)
    k_offs = (row * stride_cb + (offs_n % page_size) * stride_cs + kv_head * stride_ch)[:, None] \
        + offs_d[None, :] * stride_cd
    v_offs = (row * stride_vb + (offs_n % page_size) * stride_vs + kv_head * stride_vh)[:, None] \
        + offs_dv[None, :] * stride_vd
    k = tl.load(k_cache_ptr + k_offs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
    v = tl.load(v_cache_ptr + v_offs, mask=n_valid[:, None] & dv_valid[None, :], other=0.0)
    if FP8:
        k, v = k.to(dtype), v.to(dtype)
    return k, v


@triton.jit
def _attend(q, k, v, m_i, l_i, acc, offs_n, q_pos, key_end, scale, sliding_window, logit_cap, slope,
            HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
            MASKED: tl.constexpr):
    """One online-softmax step over a tile of keys; MASKED applies the causal, window and length masks."""
    s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION) * scale
    if HAS_CAP:
        s = logit_cap * (2.0 * tl.sigmoid(2.0 * s / logit_cap) - 1.0)  # logit_cap * tanh(s / cap)
    if HAS_ALIBI:
        s += slope[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    if MASKED:
        allowed = (offs_n[None, :] <= q_pos[:, None]) & (offs_n < key_end)[None, :]
        if HAS_WINDOW:
            allowed = allowed & (q_pos[:, None] - offs_n[None, :] < sliding_window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(lo, hi, q, m_i, l_i, acc, kv, softmax, FP8: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr):
    """`_attend` over the key tiles from lo up to hi (kv: see `_kv_tile`; softmax: the rows' positions, the scale,
    window, cap and slopes)."""
    key_end = kv[3]
    q_pos, scale, sliding_window, logit_cap, slope = softmax
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(kv, offs_n, q.dtype, FP8)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, offs_n, q_pos, key_end, scale, sliding_window, logit_cap, slope,
                                HAS_WINDOW, HAS_CAP, HAS_ALIBI, DOT_PRECISION, MASKED)
    return m_i, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qh, stride_qt, stride_qd, stride_oh, stride_ot, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    num_seqs, page_size, scale, sliding_window, logit_cap, alibi_ptr, v_scale, sinks_ptr,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, HAS_SINKS: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    TOKENS: tl.constexpr = BLOCK_M // PACK  # a tile's rows: PACK query heads x TOKENS tokens
    wait_for_inputs(USE_PDL)
    pid = tl.program_id(0)
    seqs = tl.arange(0, BLOCK_B)
    tile_starts = tl.load(cu_seqlens_ptr + seqs, mask=seqs < num_seqs, other=2**30) // TOKENS + seqs
    b = tl.sum((tile_starts <= pid).to(tl.int32), axis=0) - 1
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    tile = pid - (q_start // TOKENS + b)
    if tile * TOKENS < q_len:
        ctx = tl.load(seq_lens_ptr + b)
        rows = tl.arange(0, BLOCK_M)
        offs_m = tile * TOKENS + rows % TOKENS
        head = tl.program_id(1) * PACK + rows // TOKENS
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < q_len
        d_valid = offs_d < HEAD_DIM
        offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim may differ from q/k's (MLA)
        dv_valid = offs_dv < V_DIM
        q_pos = ctx - q_len + offs_m
        q_ptrs = q_ptr + head[:, None] * stride_qh + (q_start + offs_m)[:, None] * stride_qt \
            + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        kv_head = tl.program_id(1) * PACK // GROUP
        slope = tl.zeros([BLOCK_M], tl.float32)
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + head).to(tl.float32)

        first_pos = ctx - q_len + tile * TOKENS  # the tile's first token sees the keys up to here
        key_end = tl.minimum(ctx, first_pos + TOKENS)
        key_begin = 0
        unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # whole key tiles that every row sees
        if HAS_WINDOW:
            key_begin = tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
            unmasked_end = key_begin

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if HAS_SINKS:  # the sink: a logit with no value, in every row's denominator from the start
            m_i = tl.load(sinks_ptr + head).to(tl.float32)
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        kv = (k_cache_ptr, v_cache_ptr, block_tables_ptr + b * stride_bt, key_end, kv_head, page_size, offs_d, d_valid,
              offs_dv, dv_valid, stride_cb, stride_cs, stride_ch, stride_cd, stride_vb, stride_vs, stride_vh, stride_vd)
        softmax = (q_pos, scale, sliding_window, logit_cap, slope)
        m_i, l_i, acc = _attend_keys(key_begin, unmasked_end, q, m_i, l_i, acc, kv, softmax, FP8, HAS_WINDOW,
                                     HAS_CAP, HAS_ALIBI, DOT_PRECISION, BLOCK_N, False)
        m_i, l_i, acc = _attend_keys(tl.maximum(unmasked_end, key_begin), key_end, q, m_i, l_i, acc, kv, softmax, FP8,
                                     HAS_WINDOW, HAS_CAP, HAS_ALIBI, DOT_PRECISION, BLOCK_N, True)

        if FP8:
            acc = acc * v_scale
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + head[:, None] * stride_oh + (q_start + offs_m)[:, None] * stride_ot \
            + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & dv_valid[None, :])


def heads_per_program(group: int, block_m: int) -> int:
    """Query heads packed into one tile: all of a KV head's where that is a power of two leaving at least
    MIN_TILE_TOKENS tokens per tile, else one."""
    if group & (group - 1) == 0 and block_m // group >= MIN_TILE_TOKENS:
        return group
    return 1


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
    sliding_window: int | None = None, logit_cap: float | None = None, alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, knobs: tuple[int, int, int, int] | None = None,
    pack: int | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [1, n_heads, T, d] over the paged cache (already holding this step's k/v; an fp8
    cache's scales and sinks [n_heads] as in kernels/cached_attention.py). `knobs` (BLOCK_M, BLOCK_N, warps,
    stages) and `pack` (query heads per tile) are for benchmarks."""
    _, n_heads, num_tokens, head_dim = q.shape
    n_kv = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    v_dim = v_cache.shape[3]
    out = token_major_output(q, num_tokens, v_dim)
    if num_tokens == 0:
        return out
    block_m, block_n, warps, stages = knobs or KNOBS
    group = n_heads // n_kv
    pack = pack or heads_per_program(group, block_m)
    grid = (num_tokens // (block_m // pack) + num_seqs, n_heads // pack)
    fp8 = k_cache.dtype == FP8_DTYPE
    _paged_attention_kernel[grid](
        q, out, k_cache, v_cache, cu_seqlens, seq_lens, block_tables,
        q.stride(1), q.stride(2), q.stride(3), out.stride(1), out.stride(2), out.stride(3),
        *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        num_seqs, k_cache.shape[1], scale * k_scale if fp8 else scale, sliding_window or 0, logit_cap or 0.0,
        alibi_slopes.contiguous() if alibi_slopes is not None else q, v_scale,  # slopes [n_heads]
        sinks.contiguous() if sinks is not None else q,
        GROUP=group, PACK=pack, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        V_DIM=v_dim, BLOCK_DV=triton.next_power_of_2(v_dim),
        BLOCK_B=triton.next_power_of_2(num_seqs), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, HAS_CAP=logit_cap is not None, HAS_ALIBI=alibi_slopes is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8, HAS_SINKS=sinks is not None,
        num_warps=warps, num_stages=stages, **pdl_launch(q.device),
    )
    return out
