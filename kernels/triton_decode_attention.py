"""Triton kernels for decode-only steps of paged attention, and the paged KV-cache write.

A decode-only step (every sequence runs exactly one new token: T == B, which the shapes alone
decide, so the choice is fixed when a CUDA graph is captured) needs a different kernel shape from
prefill. The general kernel (triton_cached_attention.py) runs one program per (16-row query tile,
query head): for one query token that is 1 useful row in 16, and with GQA each KV head is read once
per query head of its group. Here (flash-decoding):
  - one program per (sequence, KV head, context split): the q tile holds the GROUP query heads that
    share the KV head (rows padded to 16 for tl.dot), so each K/V block is read once;
  - given this step's k/v (cached_attention_triton does), the program whose split holds the new
    token's position ctx - 1 first stores its k/v into the cache slot, so no separate write kernel
    runs (no other program of the step reads that slot);
  - the context is split NUM_SPLITS ways so that batch 1 still fills the GPU; each split writes its
    unnormalised partial output with its running max and sum, merged (log-sum-exp) by a small second
    kernel, or (IN_KERNEL_MERGE) by the last split to arrive, counted in a per-(sequence, KV head)
    counter it resets to 0. With enough (sequence, KV head) programs NUM_SPLITS is 1 and each program
    writes its output.
With `rope` (the cached attention op's rope_cos / rope_sin, `fuse_rope_attention`) every program rotates its
q heads as it loads them and the program storing the new token's k rotates it first, rounding as the eager
rotation does (compiled without FP contraction, as kernels/triton_rope.py is): the cache holds the keys the
reference op writes, bit for bit, and RoPE takes no launch of its own.
NUM_SPLITS depends only on the batch size and head counts (not on the context length), so it is a
constant of each captured graph; each split covers ceil(context / NUM_SPLITS) keys, computed in the
kernel. Keys are gathered through the block table per key, so any page size works.

`write_kv_cache` (prefill and mixed steps) replaces two `index_copy_` calls (each with a transpose
copy and a cast) with one launch that stores K and V of every new token straight into their slots.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .quant_act import empty_quantized
from .quant_format import FP8_DTYPE
from .triton_fp8 import saturate_e4m3, store_tile_quantized
from .triton_layout import token_major_output
from .triton_pdl import pdl_launch, wait_for_inputs
from .triton_rope import as_4d, round_products, rounded

BLOCK_N = 32  # with 4 warps, best or within 10 % of it in BENCHMARKS.md's sweep (batch 1 and 64)
# Keys per step and pipeline stages when each (sequence, KV head) is one program (no split: many sequences). H200,
# 8B shape, 64 sequences (BENCHMARKS.md, session 17): 16.0 / 69.6 us at 192 / 1,024 keys, against 17.4 / 75.3 with
# BLOCK_N and Triton's default 3 stages.
WHOLE_CONTEXT_KNOBS = (64, 2)
MAX_SPLITS = 32


class RopeRows(NamedTuple):
    """What the decode kernel needs to rotate q and k itself: cos / sin rows per token (the same for every head)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cos_strides: tuple[int, int]  # (token, dim)
    sin_strides: tuple[int, int]
    interleaved: bool
    round_products: bool


def rope_rows(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> RopeRows | None:
    """cos / sin ([..., T, d], broadcastable against q [1, n_heads, T, d]) as per-token rows, or None when they
    differ per head (the caller rotates beforehand)."""
    cos4, sin4 = (as_4d(t).expand(q.shape) for t in (cos, sin))
    if cos4.stride(1) != 0 or sin4.stride(1) != 0:
        return None
    return RopeRows(cos, sin, (cos4.stride(2), cos4.stride(3)), (sin4.stride(2), sin4.stride(3)), interleaved,
                    round_products(q, cos))


@triton.jit
def _load_rotated(row_ptrs, offs_d, stride_d, mask, cos_ptrs, sin_ptrs, ROPE: tl.constexpr, HALF: tl.constexpr,
                  ROUND: tl.constexpr):
    """The tile at row_ptrs[:, None] + offs_d * stride_d, rotated (ROPE 1: rotate-half, 2: interleaved pairs) with
    cos / sin at cos_ptrs / sin_ptrs [BLOCK_D] as kernels/triton_rope.py rotates it, in its own dtype; ROPE 0: as
    loaded."""
    x = tl.load(row_ptrs + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    if ROPE != 0:
        if ROPE == 1:
            first = offs_d < HALF
            partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        else:
            first = offs_d % 2 == 0
            partner = offs_d ^ 1
        other = tl.load(row_ptrs + partner[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        d_valid = offs_d < 2 * HALF
        cos = tl.load(cos_ptrs, mask=d_valid, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptrs, mask=d_valid, other=0.0).to(tl.float32)[None, :]
        own = rounded(x.to(tl.float32) * cos, x.dtype, ROUND)
        turned = rounded(other * sin, x.dtype, ROUND)
        x = tl.where(first[None, :], own - turned, own + turned).to(x.dtype)
    return x


@triton.jit
def _store_kv(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, t, heads, h_valid,
    stride_kh, stride_kt, stride_kd, stride_vh, stride_vt, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    page_size, k_scale, v_scale, cos_ptrs, sin_ptrs,
    K_DIM: tl.constexpr, BLOCK_K: tl.constexpr, V_DIM: tl.constexpr, BLOCK_V: tl.constexpr,
    FP8: tl.constexpr, INTERPRET: tl.constexpr, ROPE: tl.constexpr, ROUND_ROPE: tl.constexpr,
):
    """Token t's keys (rotated with ROPE) and values of `heads` into its cache slot (an fp8 cache: value / scale,
    saturated, as kernels/cached_attention.py stores them)."""
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // page_size
    offset = slot % page_size
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    k_mask = h_valid[:, None] & (offs_k < K_DIM)[None, :]
    v_mask = h_valid[:, None] & (offs_v < V_DIM)[None, :]
    k = _load_rotated(k_ptr + t * stride_kt + heads[:, None] * stride_kh, offs_k, stride_kd, k_mask, cos_ptrs,
                      sin_ptrs, ROPE, K_DIM // 2, ROUND_ROPE)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_v[None, :] * stride_vd, mask=v_mask)
    k_dst = k_cache_ptr + block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + offs_k[None, :] * stride_cd
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads[:, None] * stride_vch \
        + offs_v[None, :] * stride_vcd
    if FP8:
        k = saturate_e4m3(k.to(tl.float32) / k_scale, INTERPRET)
        v = saturate_e4m3(v.to(tl.float32) / v_scale, INTERPRET)
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


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
    heads = tl.arange(0, BLOCK_H)
    _store_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, tl.program_id(0), heads, heads < n_kv,
              stride_kh, stride_kt, stride_kd, stride_vh, stride_vt, stride_vd,
              stride_cb, stride_cs, stride_ch, stride_cd, stride_vcb, stride_vcs, stride_vch, stride_vcd,
              page_size, k_scale, v_scale, k_ptr, k_ptr, K_DIM, BLOCK_K, V_DIM, BLOCK_V, FP8, INTERPRET, 0, False)


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
def _store_output(out, out_ptr, heads, h_valid, b, n_heads, stride_oh, stride_ot, stride_od, qout_ptr, qscale_ptr,
                  stride_qs_g, stride_qs_t, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, QUANT: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """Rows `heads` [R] of sequence b's output (float32 [R, BLOCK_DV]) in out's dtype, or with QUANT that rounded
    output as e4m3 into qout [T, n_heads * V_DIM] with one scale per head at qscale[head, b] (a per-token group
    of V_DIM columns: what quantize_fp8_per_token computes from the stored output)."""
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = h_valid[:, None] & (offs_dv < V_DIM)[None, :]
    if QUANT:
        rounded = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        store_tile_quantized(rounded, qout_ptr + b * n_heads * V_DIM + heads[:, None] * V_DIM + offs_dv[None, :],
                             mask, qscale_ptr + heads * stride_qs_g + b * stride_qs_t, h_valid, INTERPRET)
    else:
        tl.store(out_ptr + heads[:, None] * stride_oh + b * stride_ot + offs_dv[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_splits(
    out_ptr, part_acc_ptr, part_ml_ptr, b, first_head, n_heads, stride_oh, stride_ot, stride_od,
    qout_ptr, qscale_ptr, stride_qs_g, stride_qs_t,
    HEADS: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    QUANT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Output of query heads first_head .. + HEADS of sequence b from their NUM_SPLITS partials
    (log-sum-exp; an empty split has m = -inf and weighs 0); with QUANT stored by `_store_output`. The loads skip
    L1 (.cg): other programs of the same kernel may have written the partials."""
    splits = tl.arange(0, NUM_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_valid = offs_dv < V_DIM
    for g in range(HEADS):
        head = first_head + g
        rows = (b * n_heads + head) * NUM_SPLITS + splits
        m = tl.load(part_ml_ptr + rows * 2, cache_modifier=".cg")
        l = tl.load(part_ml_ptr + rows * 2 + 1, cache_modifier=".cg")
        acc = tl.load(part_acc_ptr + rows[:, None] * V_DIM + offs_dv[None, :], mask=dv_valid[None, :], other=0.0,
                      cache_modifier=".cg")
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp(m - m_max)  # empty splits: exp(-inf) = 0
        denom = tl.sum(w * l, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom == 0.0, 1.0, denom)
        if QUANT:
            one = head + tl.arange(0, 1)
            _store_output(out[None, :], out_ptr, one, one < n_heads, b, n_heads, stride_oh, stride_ot, stride_od,
                          qout_ptr, qscale_ptr, stride_qs_g, stride_qs_t, V_DIM, BLOCK_DV, QUANT, INTERPRET)
        else:  # as a vector: the sum over splits keeps the layout (and order) it has without QUANT
            tl.store(out_ptr + head * stride_oh + b * stride_ot + offs_dv * stride_od,
                     out.to(out_ptr.dtype.element_ty), mask=dv_valid)


@triton.jit
def _decode_attention_kernel(
    q_ptr, out_ptr, part_acc_ptr, part_ml_ptr, counts_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr,
    block_tables_ptr, k_ptr, v_ptr, slot_ptr, cos_ptr, sin_ptr, qout_ptr, qscale_ptr, stride_qs_g, stride_qs_t,
    stride_qh, stride_qt, stride_qd, stride_oh, stride_ot, stride_od,
    stride_nkh, stride_nkt, stride_nkd, stride_nvh, stride_nvt, stride_nvd,  # this step's k/v
    stride_cb, stride_cs, stride_ch, stride_cd, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    stride_cos_t, stride_cos_d, stride_sin_t, stride_sin_d,
    page_size, scale, sliding_window, logit_cap, alibi_ptr, k_scale, v_scale, sinks_ptr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr, WRITE_KV: tl.constexpr, MERGE: tl.constexpr, INTERPRET: tl.constexpr,
    ROPE: tl.constexpr, ROUND_ROPE: tl.constexpr, QUANT: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    wait_for_inputs(USE_PDL)
    b = tl.program_id(0)  # sequence == its one query token (T == B)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n_kv = tl.num_programs(1)
    n_heads = n_kv * GROUP
    ctx = tl.load(seq_lens_ptr + b)
    key_begin = 0
    if HAS_WINDOW:
        key_begin = tl.maximum(ctx - sliding_window, 0)  # the query sits at ctx - 1
    span = ctx - key_begin
    chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = key_begin + split * chunk
    end = tl.minimum(start + chunk, ctx)
    offs_d = tl.arange(0, BLOCK_D)
    cos_ptrs = cos_ptr + b * stride_cos_t + offs_d * stride_cos_d  # this token's rotation (ROPE)
    sin_ptrs = sin_ptr + b * stride_sin_t + offs_d * stride_sin_d

    if WRITE_KV:
        # This step's token (position ctx - 1) lies in exactly one split; that program stores its k/v
        # first, and no other program of this step reads the slot. The barrier makes the store
        # visible to all of the program's threads before the key loop reads the cache.
        if (start <= ctx - 1) & (ctx - 1 < end):
            own = kv_head + tl.arange(0, 1)
            _store_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, b, own, own < n_kv,
                      stride_nkh, stride_nkt, stride_nkd, stride_nvh, stride_nvt, stride_nvd,
                      stride_cb, stride_cs, stride_ch, stride_cd, stride_vb, stride_vs, stride_vh, stride_vd,
                      page_size, k_scale, v_scale, cos_ptrs, sin_ptrs, HEAD_DIM, BLOCK_D, V_DIM, BLOCK_DV, FP8,
                      INTERPRET, ROPE, ROUND_ROPE)
        tl.debug_barrier()

    offs_g = tl.arange(0, BLOCK_G)
    g_valid = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    d_valid = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_valid = offs_dv < V_DIM
    q = _load_rotated(q_ptr + heads[:, None] * stride_qh + b * stride_qt, offs_d, stride_qd,
                      g_valid[:, None] & d_valid[None, :], cos_ptrs, sin_ptrs, ROPE, HEAD_DIM // 2, ROUND_ROPE)
    slopes = tl.zeros([BLOCK_G], tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=g_valid, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if HAS_SINKS:  # the sink (a logit with no value) joins the first split's denominator; the merge carries it
        sink = tl.load(sinks_ptr + heads, mask=g_valid, other=0.0).to(tl.float32)
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
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
        _store_output(out, out_ptr, heads, g_valid, b, n_heads, stride_oh, stride_ot, stride_od, qout_ptr, qscale_ptr,
                      stride_qs_g, stride_qs_t, V_DIM, BLOCK_DV, QUANT, INTERPRET)
    else:
        # partials laid out [B, n_heads, NUM_SPLITS, V_DIM] and [B, n_heads, NUM_SPLITS, 2]
        row_ids = (b * n_heads + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row_ids[:, None] * V_DIM + offs_dv[None, :], acc,
                 mask=g_valid[:, None] & dv_valid[None, :])
        tl.store(part_ml_ptr + row_ids * 2, m_i, mask=g_valid)
        tl.store(part_ml_ptr + row_ids * 2 + 1, l_i, mask=g_valid)
        if MERGE:
            # The last of the NUM_SPLITS programs of (b, kv_head) to get here merges them: the barrier
            # puts all threads' partial stores before the release, the acquire lets the last one see
            # everyone's. It resets the counter, so the buffer is all zeros again after the kernel.
            tl.debug_barrier()
            counter = counts_ptr + b * n_kv + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
                _merge_splits(out_ptr, part_acc_ptr, part_ml_ptr, b, kv_head * GROUP, n_heads,
                              stride_oh, stride_ot, stride_od, qout_ptr, qscale_ptr, stride_qs_g, stride_qs_t,
                              GROUP, V_DIM, BLOCK_DV, NUM_SPLITS, QUANT, INTERPRET)
                tl.store(counter, 0)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, stride_oh, stride_ot, stride_od, qout_ptr, qscale_ptr, stride_qs_g,
    stride_qs_t, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, QUANT: tl.constexpr = False,
    INTERPRET: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """The splits' merge as a second launch, one program per (sequence, query head): only when there
    are no split counters (see `_split_counters`)."""
    wait_for_inputs(USE_PDL)
    _merge_splits(out_ptr, part_acc_ptr, part_ml_ptr, tl.program_id(0), tl.program_id(1), tl.num_programs(1),
                  stride_oh, stride_ot, stride_od, qout_ptr, qscale_ptr, stride_qs_g, stride_qs_t, 1, V_DIM, BLOCK_DV,
                  NUM_SPLITS, QUANT, INTERPRET)


_SM_COUNT: dict[int, int] = {}
# The splits merged by the last of them to arrive (no second launch), or by the reduce kernel. Off by default: the
# one H200 run with it on (BENCHMARKS.md session 10) measured bf16 batch-1 decode ~3 % below earlier sessions; the
# suspect is the merge's tail (one program merging its GROUP heads one after another). AUTODEPLOY_DECODE_MERGE=1: on.
IN_KERNEL_MERGE = os.environ.get("AUTODEPLOY_DECODE_MERGE", "0") == "1"
MAX_COUNTERS = 65536  # (sequence, KV head) pairs: 256 KiB of int32 per device
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _num_splits(num_seqs: int, n_kv: int, device: torch.device) -> int:
    """Enough (sequence, KV head, split) programs to cover the SMs about twice; 1 when there already are."""
    if device.type != "cuda":
        sms = 8  # interpreter runs (tests): still exercise the split + merge path
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


def _split_counters(pairs: int, device: torch.device) -> torch.Tensor | None:
    """The device's arrival counters for the in-kernel merge (int32 zeros, which every call leaves
    zero), or None: more pairs than counters, or a CUDA graph capture before any eager call (allocating
    there would take graph-pool memory). The runtime runs each bucket eagerly before capturing it
    (runtime/cuda_graphs.py), so the buffer exists by then. Calls on one device must not overlap (one
    stream, as the runtime runs)."""
    if pairs > MAX_COUNTERS:
        return None
    if device not in _SPLIT_COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _SPLIT_COUNTERS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _SPLIT_COUNTERS[device]


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
    logit_cap: float | None = None, num_splits: int | None = None, block_n: int | None = None,
    num_warps: int = 4, alibi_slopes: torch.Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
    k: torch.Tensor | None = None, v: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
    merge_in_kernel: bool | None = None, rope: RopeRows | None = None, num_stages: int | None = None,
    quant_group: int | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [1, n_heads, B, d] (one token per sequence, at position seq_lens[b] - 1)
    over the paged cache. With k, v ([1, n_kv, B, d], any strides) and slot_mapping the kernel also
    stores this step's keys/values into their slots (as `write_kv_cache` would); without them the
    cache already holds them. With `rope` (`rope_rows`) q and this step's k are rotated first; with `sinks`
    [n_heads] each head's softmax denominator also holds exp(its sink) (kernels/cached_attention.py).
    `merge_in_kernel` (None: IN_KERNEL_MERGE) picks how splits merge; `num_splits`, `block_n`, `num_warps` and
    `num_stages` override the defaults (benchmarks/decode_attention_bench.py sweeps them); the scales are an fp8 cache's
    (kernels/cached_attention.py). With `quant_group` (the value head dim: one scale per head and token) the output
    is not stored: it comes back as quantize_fp8_per_token would make it of [1, B, n_heads * d] (e4m3 [1, B,
    n_heads * d], float32 scales [1, B, n_heads] group-major), in the kernel's epilogue (`fuse_attention_quant_fp8`)."""
    _, n_heads, num_seqs, head_dim = q.shape
    n_kv = k_cache.shape[2]
    v_dim = v_cache.shape[3]
    group = n_heads // n_kv
    quant = quant_group is not None
    if quant and quant_group != v_dim:
        raise ValueError(f"decode_attention quantizes per head: quant_group must be the value head dim {v_dim}, "
                         f"not {quant_group}")
    out = q if quant else token_major_output(q, num_seqs, v_dim)  # with quant only its dtype is read
    q_out, q_scale = empty_quantized(q.new_empty(1, 1, 1).expand(1, num_seqs, n_heads * v_dim), v_dim) if quant else (q, q)
    result = (q_out, q_scale) if quant else out
    if num_seqs == 0:
        return result
    splits = num_splits or _num_splits(num_seqs, n_kv, q.device)
    default_n, default_stages = WHOLE_CONTEXT_KNOBS if splits == 1 else (BLOCK_N, None)
    block_n, num_stages = block_n or default_n, num_stages or default_stages
    fp8 = k_cache.dtype == FP8_DTYPE
    counters = None
    if splits > 1:
        part_acc = torch.empty(num_seqs, n_heads, splits, v_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_seqs, n_heads, splits, 2, dtype=torch.float32, device=q.device)
        in_kernel = IN_KERNEL_MERGE if merge_in_kernel is None else merge_in_kernel
        counters = _split_counters(num_seqs * n_kv, q.device) if in_kernel else None
    else:
        part_acc = part_ml = out  # unused
    write_kv = k is not None
    if not write_kv:
        k = v = slot_mapping = q  # unused
    if rope is not None and not write_kv:
        raise ValueError("decode_attention rotates k only as it stores it: rope needs k, v and slot_mapping")
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(v_dim)
    pdl = pdl_launch(q.device)
    scale_strides = (q_scale.stride(-1), q_scale.stride(-2)) if quant else (0, 0)  # (head, token)
    cos, sin = (rope.cos, rope.sin) if rope is not None else (q, q)  # unused without rope
    rope_strides = (*rope.cos_strides, *rope.sin_strides) if rope is not None else (0, 0, 0, 0)
    _decode_attention_kernel[(num_seqs, n_kv, splits)](
        q, out, part_acc, part_ml, counters if counters is not None else seq_lens, k_cache, v_cache, seq_lens,
        block_tables, k, v, slot_mapping, cos, sin, q_out, q_scale, *scale_strides,
        q.stride(1), q.stride(2), q.stride(3), out.stride(1), out.stride(2), out.stride(3),
        k.stride(1), k.stride(2), k.stride(3), v.stride(1), v.stride(2), v.stride(3),
        *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *rope_strides,
        k_cache.shape[1], scale * k_scale if fp8 else scale, sliding_window or 0, logit_cap or 0.0,
        alibi_slopes.contiguous() if alibi_slopes is not None else q, k_scale, v_scale,  # slopes [n_heads]
        sinks.contiguous() if sinks is not None else q,  # sinks [n_heads]
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        V_DIM=v_dim, BLOCK_DV=block_dv, NUM_SPLITS=splits, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, HAS_CAP=logit_cap is not None, HAS_ALIBI=alibi_slopes is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8, WRITE_KV=write_kv,
        MERGE=counters is not None, INTERPRET=not q.is_cuda,
        ROPE=0 if rope is None else 2 if rope.interleaved else 1, ROUND_ROPE=rope is not None and rope.round_products,
        QUANT=quant, HAS_SINKS=sinks is not None, num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}),
        enable_fp_fusion=rope is None, **pdl,  # RoPE's products rounded: kernels/triton_rope.py
    )
    if splits > 1 and counters is None:
        _decode_reduce_kernel[(num_seqs, n_heads)](
            out, part_acc, part_ml, out.stride(1), out.stride(2), out.stride(3), q_out, q_scale, *scale_strides,
            V_DIM=v_dim, BLOCK_DV=block_dv, NUM_SPLITS=splits, QUANT=quant, INTERPRET=not q.is_cuda, **pdl,
        )
    return result
