"""Triton kernels for decode-only steps of paged attention, and the paged KV-cache write.

A decode-only step (every sequence runs exactly one new token: T == B, which the shapes alone
decide, so the choice is fixed when a CUDA graph is captured) needs a different kernel shape from
prefill. The general kernel (triton_cached_attention.py) runs one program per (16-row query tile,
query head): for one query token that is 1 useful row in 16, and with GQA each KV head is read once
per query head of its group. Here (flash-decoding):
  - one program per (sequence, KV head, context split): the q tile holds the GROUP query heads that
    share the KV head (rows padded to 16 for tl.dot), so each K/V block is read once;
  - the context is split NUM_SPLITS ways so that batch 1 still fills the GPU; each split writes its
    unnormalised partial output with its running max and sum, and a small second kernel merges the
    splits (log-sum-exp). With enough (sequence, KV head) programs NUM_SPLITS is 1 and the first
    kernel writes the output directly.
NUM_SPLITS depends only on the batch size and head counts (not on the context length), so it is a
constant of each captured graph; each split covers ceil(context / NUM_SPLITS) keys, computed in the
kernel. Keys are gathered through the block table per key, so any page size works.

`write_kv_cache` replaces two `index_copy_` calls (each with a transpose copy and a cast) with one
launch that stores K and V of every new token straight into their slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_format import FP8_DTYPE
from .triton_fp8 import saturate_e4m3
from .triton_pdl import pdl_launch, wait_for_inputs

BLOCK_N = 32  # with 4 warps, best or within 10 % of it in BENCHMARKS.md's sweep (batch 1 and 64)
MAX_SPLITS = 32


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kh, stride_kt, stride_kd, stride_vh, stride_vt, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    page_size, n_kv, k_scale, v_scale,
    K_DIM: tl.constexpr, BLOCK_K: tl.constexpr, V_DIM: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_inputs(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // page_size
    offset = slot % page_size
    heads = tl.arange(0, BLOCK_H)
    h_valid = heads < n_kv
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    k_mask = h_valid[:, None] & (offs_k < K_DIM)[None, :]
    v_mask = h_valid[:, None] & (offs_v < V_DIM)[None, :]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + offs_k[None, :] * stride_kd, mask=k_mask)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_v[None, :] * stride_vd, mask=v_mask)
    k_dst = k_cache_ptr + block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + offs_k[None, :] * stride_cd
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads[:, None] * stride_vch \
        + offs_v[None, :] * stride_vcd
    if FP8:  # stored as value / scale, saturated (kernels/cached_attention.py)
        k = saturate_e4m3(k.to(tl.float32) / k_scale, INTERPRET)
        v = saturate_e4m3(v.to(tl.float32) / v_scale, INTERPRET)
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store this step's keys/values ([1, n_kv, T, d], any strides) into their cache slots (an fp8
    cache: divided by the scales and saturated)."""
    num_tokens, n_kv = k.shape[2], k.shape[1]
    if num_tokens == 0:
        return
    k_dim, v_dim = k.shape[3], v.shape[3]
    _kv_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(1), k.stride(2), k.stride(3), v.stride(1), v.stride(2), v.stride(3),
        *k_cache.stride(), *v_cache.stride(), k_cache.shape[1], n_kv, k_scale, v_scale,
        K_DIM=k_dim, BLOCK_K=triton.next_power_of_2(k_dim), V_DIM=v_dim, BLOCK_V=triton.next_power_of_2(v_dim),
        BLOCK_H=triton.next_power_of_2(n_kv), FP8=k_cache.dtype == FP8_DTYPE, INTERPRET=not k.is_cuda,
        **pdl_launch(k.device),
    )


@triton.jit
def _decode_attention_kernel(
    q_ptr, out_ptr, part_acc_ptr, part_ml_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qh, stride_qt, stride_qd, stride_oh, stride_ot, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    page_size, scale, sliding_window, logit_cap, alibi_ptr, v_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    wait_for_inputs(USE_PDL)
    b = tl.program_id(0)  # sequence == its one query token (T == B)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n_heads = tl.num_programs(1) * GROUP
    ctx = tl.load(seq_lens_ptr + b)
    key_begin = 0
    if HAS_WINDOW:
        key_begin = tl.maximum(ctx - sliding_window, 0)  # the query sits at ctx - 1
    span = ctx - key_begin
    chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = key_begin + split * chunk
    end = tl.minimum(start + chunk, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    g_valid = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_valid = offs_dv < V_DIM
    q = tl.load(q_ptr + heads[:, None] * stride_qh + b * stride_qt + offs_d[None, :] * stride_qd,
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)
    slopes = tl.zeros([BLOCK_G], tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=g_valid, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        block = tl.load(block_tables_ptr + b * stride_bt + offs_n // page_size, mask=n_valid, other=0)
        row = block.to(tl.int64)
        in_page = offs_n % page_size
        k = tl.load(k_cache_ptr + (row * stride_cb + in_page * stride_cs + kv_head * stride_ch)[:, None]
                    + offs_d[None, :] * stride_cd, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + (row * stride_vb + in_page * stride_vs + kv_head * stride_vh)[:, None]
                    + offs_dv[None, :] * stride_vd, mask=n_valid[:, None] & dv_valid[None, :], other=0.0)
        if FP8:  # multiply in q's dtype; the scales are folded into `scale` and the output
            k, v = k.to(q.dtype), v.to(q.dtype)
        s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION) * scale
        if HAS_CAP:
            s = logit_cap * (2.0 * tl.sigmoid(2.0 * s / logit_cap) - 1.0)  # logit_cap * tanh(s / cap)
        if HAS_ALIBI:
            s += slopes[:, None] * (offs_n - (ctx - 1)).to(tl.float32)[None, :]
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if FP8:
        acc = acc * v_scale
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + heads[:, None] * stride_oh + b * stride_ot + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_valid[:, None] & dv_valid[None, :])
    else:
        # partials laid out [B, n_heads, NUM_SPLITS, V_DIM] and [B, n_heads, NUM_SPLITS, 2]
        row_ids = (b * n_heads + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row_ids[:, None] * V_DIM + offs_dv[None, :], acc,
                 mask=g_valid[:, None] & dv_valid[None, :])
        tl.store(part_ml_ptr + row_ids * 2, m_i, mask=g_valid)
        tl.store(part_ml_ptr + row_ids * 2 + 1, l_i, mask=g_valid)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, stride_oh, stride_ot, stride_od,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_inputs(USE_PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    n_heads = tl.num_programs(1)
    splits = tl.arange(0, NUM_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_valid = offs_dv < V_DIM
    rows = (b * n_heads + head) * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + rows * 2)
    l = tl.load(part_ml_ptr + rows * 2 + 1)
    acc = tl.load(part_acc_ptr + rows[:, None] * V_DIM + offs_dv[None, :], mask=dv_valid[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_max)  # empty splits: exp(-inf) = 0
    denom = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + head * stride_oh + b * stride_ot + offs_dv * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=dv_valid)


_SM_COUNT: dict[int, int] = {}


def _num_splits(num_seqs: int, n_kv: int, device: torch.device) -> int:
    """Enough (sequence, KV head, split) programs to cover the SMs about twice; 1 when there already are."""
    if device.type != "cuda":
        sms = 8  # interpreter runs (tests): still exercise the split + reduce path
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SM_COUNT[index]
    programs = num_seqs * n_kv
    splits = 1
    while splits < MAX_SPLITS and programs * splits < 2 * sms:
        splits *= 2
    return splits


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
    logit_cap: float | None = None, num_splits: int | None = None, block_n: int = BLOCK_N,
    num_warps: int = 4, alibi_slopes: torch.Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of q [1, n_heads, B, d] (one token per sequence, at position seq_lens[b] - 1)
    over the paged cache, which already holds this step's k/v. `num_splits`, `block_n` and
    `num_warps` override the defaults (benchmarks/decode_attention_bench.py sweeps them); the scales
    are an fp8 cache's (kernels/cached_attention.py)."""
    _, n_heads, num_seqs, head_dim = q.shape
    n_kv = k_cache.shape[2]
    v_dim = v_cache.shape[3]
    group = n_heads // n_kv
    out = q.new_empty(1, n_heads, num_seqs, v_dim)
    if num_seqs == 0:
        return out
    splits = num_splits or _num_splits(num_seqs, n_kv, q.device)
    fp8 = k_cache.dtype == FP8_DTYPE
    if splits > 1:
        part_acc = torch.empty(num_seqs, n_heads, splits, v_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_seqs, n_heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(v_dim)
    pdl = pdl_launch(q.device)
    _decode_attention_kernel[(num_seqs, n_kv, splits)](
        q, out, part_acc, part_ml, k_cache, v_cache, seq_lens, block_tables,
        q.stride(1), q.stride(2), q.stride(3), out.stride(1), out.stride(2), out.stride(3),
        *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        k_cache.shape[1], scale * k_scale if fp8 else scale, sliding_window or 0, logit_cap or 0.0,
        alibi_slopes.contiguous() if alibi_slopes is not None else q, v_scale,  # slopes [n_heads]
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        V_DIM=v_dim, BLOCK_DV=block_dv, NUM_SPLITS=splits, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, HAS_CAP=logit_cap is not None, HAS_ALIBI=alibi_slopes is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8, num_warps=num_warps, **pdl,
    )
    if splits > 1:
        _decode_reduce_kernel[(num_seqs, n_heads)](
            out, part_acc, part_ml, out.stride(1), out.stride(2), out.stride(3),
            V_DIM=v_dim, BLOCK_DV=block_dv, NUM_SPLITS=splits, **pdl,
        )
    return out
