"""Triton kernel for paged attention over a packed batch (the `cached_attention_triton` backend).

A correct, portable first kernel (fast GPU variants come later): one program per (query tile of
one sequence, query head). Sequences' query tiles are numbered consecutively: sequence b owns tiles
starting at cu_seqlens[b] // BLOCK_M + b, so the grid T // BLOCK_M + B is known from shapes alone
(no host sync for the longest prompt) and each program finds its sequence by counting tile starts.
Keys are gathered through the block table per key, so any page size works. Online softmax in
float32. Imported lazily: `triton.jit` fixes interpreter vs compiled mode when it decorates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_format import FP8_DTYPE
from .triton_layout import token_major_output
from .triton_pdl import pdl_launch, wait_for_inputs

BLOCK_M = 16
BLOCK_N = 32


@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qh, stride_qt, stride_qd, stride_oh, stride_ot, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    num_seqs, page_size, scale, sliding_window, logit_cap, alibi_ptr, v_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_inputs(USE_PDL)
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seqs = tl.arange(0, BLOCK_B)
    tile_starts = tl.load(cu_seqlens_ptr + seqs, mask=seqs < num_seqs, other=2**30) // BLOCK_M + seqs
    b = tl.sum((tile_starts <= pid).to(tl.int32), axis=0) - 1
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    tile = pid - (q_start // BLOCK_M + b)
    if tile * BLOCK_M < q_len:
        ctx = tl.load(seq_lens_ptr + b)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < q_len
        d_valid = offs_d < HEAD_DIM
        offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim may differ from q/k's (MLA)
        dv_valid = offs_dv < V_DIM
        q_pos = ctx - q_len + offs_m
        q_ptrs = q_ptr + head * stride_qh + (q_start + offs_m)[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        kv_head = head // GROUP
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + head).to(tl.float32)

        key_end = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M)
        key_begin = 0
        if HAS_WINDOW:
            key_begin = tl.maximum(ctx - q_len + tile * BLOCK_M - sliding_window + 1, 0) // BLOCK_N * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for n_start in range(key_begin, key_end, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_valid = offs_n < key_end
            block = tl.load(block_tables_ptr + b * stride_bt + offs_n // page_size, mask=n_valid, other=0)
            row = block.to(tl.int64)
            k_offs = (row * stride_cb + (offs_n % page_size) * stride_cs + kv_head * stride_ch)[:, None] \
                + offs_d[None, :] * stride_cd
            v_offs = (row * stride_vb + (offs_n % page_size) * stride_vs + kv_head * stride_vh)[:, None] \
                + offs_dv[None, :] * stride_vd
            k = tl.load(k_cache_ptr + k_offs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            v = tl.load(v_cache_ptr + v_offs, mask=n_valid[:, None] & dv_valid[None, :], other=0.0)
            if FP8:  # multiply in q's dtype; the scales are folded into `scale` and the output
                k, v = k.to(q.dtype), v.to(q.dtype)

            s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION) * scale
            if HAS_CAP:
                s = logit_cap * (2.0 * tl.sigmoid(2.0 * s / logit_cap) - 1.0)  # logit_cap * tanh(s / cap)
            if HAS_ALIBI:
                s += slope * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
            allowed = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
            if HAS_WINDOW:
                allowed = allowed & (q_pos[:, None] - offs_n[None, :] < sliding_window)
            s = tl.where(allowed, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if FP8:
            acc = acc * v_scale
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + head * stride_oh + (q_start + offs_m)[:, None] * stride_ot + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & dv_valid[None, :])


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
    sliding_window: int | None = None, logit_cap: float | None = None, alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of q [1, n_heads, T, d] over the paged cache (already holding this step's k/v; an fp8
    cache's scales as in kernels/cached_attention.py)."""
    _, n_heads, num_tokens, head_dim = q.shape
    n_kv = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    v_dim = v_cache.shape[3]
    out = token_major_output(q, num_tokens, v_dim)
    if num_tokens == 0:
        return out
    grid = (num_tokens // BLOCK_M + num_seqs, n_heads)
    fp8 = k_cache.dtype == FP8_DTYPE
    _paged_attention_kernel[grid](
        q, out, k_cache, v_cache, cu_seqlens, seq_lens, block_tables,
        q.stride(1), q.stride(2), q.stride(3), out.stride(1), out.stride(2), out.stride(3),
        *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        num_seqs, k_cache.shape[1], scale * k_scale if fp8 else scale, sliding_window or 0, logit_cap or 0.0,
        alibi_slopes.contiguous() if alibi_slopes is not None else q, v_scale,  # slopes [n_heads]
        GROUP=n_heads // n_kv, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        V_DIM=v_dim, BLOCK_DV=triton.next_power_of_2(v_dim),
        BLOCK_B=triton.next_power_of_2(num_seqs), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HAS_WINDOW=sliding_window is not None, HAS_CAP=logit_cap is not None, HAS_ALIBI=alibi_slopes is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8, **pdl_launch(q.device),
    )
    return out
