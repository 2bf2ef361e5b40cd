"""`autodeploy::moe_triton`: the routed experts as two grouped GEMMs over (token, slot) pairs sorted by expert.

The reference loops over the used experts on the host (`ids.unique().tolist()`): a device sync per layer, so a
MoE step can neither overlap nor be captured in a CUDA graph. Here nothing leaves the device and every shape
follows from the inputs' shapes:

1. `expert_tiles`: each of the T * K (token, slot) pairs sorted by expert (stable), every expert's run padded to
   whole tiles of BLOCK_M pairs, in buffers sized for the worst case (at most P / BLOCK_M + min(P, E) tiles for
   P pairs and E experts): the pair id of each tile row (padding = P) and the expert of each tile (E past the
   used ones, whose programs return at once). Decode's few pairs: one Triton program; a prompt's: torch's sort.
2. `_grouped_gemm_kernel` for gate_up: a program is one tile of pairs x BLOCK_N outputs of its expert's weight,
   its rows gathered from x (row = pair // K); out [P, 2I] in x's dtype, plus the expert's bias.
3. the gated activation (kernels/triton_gated_act.py) on the [P, 2I] halves -> [P, I];
4. the same GEMM for down on those rows (row = pair) -> [P, H] in x's dtype, then each pair times its routing
   weight, summed over the K slots in float32: the reference's roundings (each expert's output in x's dtype,
   the weighted sum in float32), in another order.

float32 models keep the reference (tl.dot would round them to tf32). Tiles: 16 pairs while experts see few
tokens each (decode), else 64. At one token the GEMMs stream the 8 routed experts at ~1.5 TB/s (few programs, each
a long K loop, and 15 of the tile's 16 rows padding): a GEMV form for decode is the next step.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from .moe import moe as moe_reference
from .gated_act import split_gate_up
from .quant_moe import fp8_moe as fp8_moe_reference
from .triton_fp8_act_quant import quantize_fp8_per_token
from .triton_gated_act import gated_act, gated_act_quant_fp8
from .triton_layout import as_rows

# (BLOCK_N, BLOCK_K, warps, stages): the best of a sweep on an H200 for Qwen3-30B-A3B's experts (BENCHMARKS.md,
# session 21: per layer 48.9 us at one token, 337.2 at 64, against 54.0 / 346.4 with (64, 64, 4, 3)).
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 128, 4, 4
# Up to this many pairs (and experts) one Triton program sorts them (decode: 1 launch instead of ~25 torch kernels);
# its one-hot chunks hold ONE_HOT_ELEMENTS pair-expert entries.
ONE_PROGRAM_PAIRS, ONE_PROGRAM_EXPERTS, ONE_HOT_ELEMENTS = 4096, 512, 16384
FEW_PAIRS_PER_EXPERT = 4  # at most this many pairs per expert on average: tiles of 16 pairs, else 64


def expert_tiles(topk_ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair id per tile row [tiles * block_m], P where padding; expert per tile [tiles], `experts` where unused),
    int32, computed on topk_ids' device without a host sync: by one program up to ONE_PROGRAM_PAIRS pairs
    (decode), else by torch's sort."""
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    tiles = pairs // block_m + min(pairs, experts)
    if pairs <= ONE_PROGRAM_PAIRS and experts <= ONE_PROGRAM_EXPERTS:
        return _expert_tiles_one_program(flat, experts, block_m, tiles)
    return _expert_tiles_sorted(flat.long(), experts, block_m, tiles)


def _expert_tiles_sorted(flat: torch.Tensor, experts: int, block_m: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs, device = flat.numel(), flat.device
    counts = torch.zeros(experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    expert_tile_count = (counts + block_m - 1) // block_m
    tile_end = expert_tile_count.cumsum(0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[by_expert]
    rows = torch.full((tiles * block_m,), pairs, dtype=torch.int32, device=device)
    rows[(tile_end - expert_tile_count)[by_expert] * block_m + rank] = order.int()
    tile_expert = torch.searchsorted(tile_end, torch.arange(tiles, device=device), right=True).int()
    return rows, tile_expert


def _expert_tiles_one_program(flat: torch.Tensor, experts: int, block_m: int,
                              tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.empty(tiles * block_m, dtype=torch.int32, device=flat.device)
    tile_expert = torch.empty(tiles, dtype=torch.int32, device=flat.device)
    block_e = triton.next_power_of_2(experts)
    _expert_tiles_kernel[(1,)](flat, rows, tile_expert, flat.numel(), experts, tiles, BLOCK_M=block_m,
                               BLOCK_P=max(16, ONE_HOT_ELEMENTS // block_e), BLOCK_E=block_e, num_warps=8)
    return rows, tile_expert


@triton.jit
def _expert_tiles_kernel(ids_ptr, rows_ptr, tile_expert_ptr, pairs, experts, tiles, BLOCK_M: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """`expert_tiles` in one program, pairs in chunks of BLOCK_P as one-hot [BLOCK_P, BLOCK_E] tiles: counts per
    expert, tiles per expert and their prefix sums, then each pair's slot (its rank among the earlier pairs of its
    expert: the sort's stable order, without a sort)."""
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, pairs, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + offs_p, mask=offs_p < pairs, other=-1)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    expert_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(expert_tiles, axis=0)
    tile_end = tl.where(offs_e < experts, tile_end, 1 << 30)  # no tile lies in the padding experts
    for t0 in range(0, tiles, BLOCK_P):
        offs_t = t0 + tl.arange(0, BLOCK_P)
        expert = tl.sum((tile_end[None, :] <= offs_t[:, None]).to(tl.int32), axis=1)  # experts ending before it
        tl.store(tile_expert_ptr + offs_t, tl.minimum(expert, experts), mask=offs_t < tiles)
    for r0 in range(0, tiles * BLOCK_M, BLOCK_P):
        offs_r = r0 + tl.arange(0, BLOCK_P)
        tl.store(rows_ptr + offs_r, tl.zeros([BLOCK_P], dtype=tl.int32) + pairs, mask=offs_r < tiles * BLOCK_M)
    tl.debug_barrier()  # the padding is stored before the pairs overwrite their slots
    first_row = (tile_end - expert_tiles) * BLOCK_M
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, pairs, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + offs_p, mask=offs_p < pairs, other=-1)
        one_hot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
        rank = tl.sum((tl.cumsum(one_hot, axis=0) - 1 + seen[None, :]) * one_hot, axis=1)
        slot = tl.sum(first_row[None, :] * one_hot, axis=1) + rank
        tl.store(rows_ptr + slot, offs_p.to(tl.int32), mask=offs_p < pairs)
        seen += tl.sum(one_hot, axis=0)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, b_ptr, out_ptr, rows_ptr, tile_expert_ptr, pairs, experts, N, K,
    stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_om,
    a_scale_ptr, stride_asm, stride_asg, w_scale_ptr, stride_wse, stride_wsn, stride_wsg,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, FP8: tl.constexpr = False, GROUPED: tl.constexpr = False,
    W_SCALE: tl.constexpr = 0,
):
    """out[pair, n] = a[pair // TOP_K] . w[expert, n] (+ b[expert, n]) for one tile of pairs of one expert.

    FP8: a and w e4m3, a's scale per row (or, GROUPED, per row and K step of BLOCK_K columns: each step's product
    scaled as it is added), w's per expert (W_SCALE 1), per output channel (2) or per BLOCK_K x BLOCK_K block (3,
    with GROUPED), all float32."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= experts:  # past the used experts' tiles
        return
    pair = tl.load(rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < pairs
    a_row = (pair // TOP_K).to(tl.int64)
    a_rows = a_ptr + a_row[:, None] * stride_am
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_safe = tl.minimum(offs_n, N - 1)
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + n_safe[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + offs_k[None, :], mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=offs_k[:, None] < K, other=0.0)
        if INTERPRET:  # the interpreter's bf16 / e4m3 dots are wrong; float32 holds their products exactly
            a, w = a.to(tl.float32), w.to(tl.float32)
        if GROUPED:
            group = k0 // BLOCK_K
            scale = tl.load(a_scale_ptr + a_row * stride_asm + group * stride_asg, mask=valid, other=0.0)[:, None]
            if W_SCALE == 3:
                block = w_scale_ptr + expert * stride_wse + (n_safe // BLOCK_K) * stride_wsn + group * stride_wsg
                scale = scale * tl.load(block)[None, :]
            acc += tl.dot(a, w) * scale
        else:
            acc = tl.dot(a, w, acc)
    if FP8 and not GROUPED:
        acc *= tl.load(a_scale_ptr + a_row * stride_asm, mask=valid, other=0.0)[:, None]
    if W_SCALE == 1:
        acc *= tl.load(w_scale_ptr + expert * stride_wse)
    elif W_SCALE == 2:
        acc *= tl.load(w_scale_ptr + expert * stride_wse + n_safe * stride_wsn)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                 tile_expert: torch.Tensor, pairs: int, top_k: int, block_m: int, a_scale: torch.Tensor | None = None,
                 w_scale: torch.Tensor | None = None, group: int = 0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[pairs, N] = a[pair // top_k] @ w[expert of the pair].T (+ bias[expert]), in out_dtype (a's by default); w
    [E, N, K] in any strides (a graph may hold the experts transposed). With `a_scale` (e4m3 a and w): a's float32
    scales [rows, 1] or, with `group`, [rows, K / group]; w_scale [E], [E, N] or, with `group`, [E, N / group,
    K / group]."""
    experts, n, k = w.shape
    out = torch.empty(pairs, n, dtype=out_dtype or a.dtype, device=a.device)
    grid = (tile_expert.numel(), triton.cdiv(n, BLOCK_N))
    fp8 = a_scale is not None
    if fp8:
        w_scale = w_scale.float()
        scales = dict(a_scale_ptr=a_scale, stride_asm=a_scale.stride(0), stride_asg=a_scale.stride(1),
                      w_scale_ptr=w_scale, stride_wse=w_scale.stride(0) if w_scale.dim() else 0,
                      stride_wsn=w_scale.stride(1) if w_scale.dim() > 1 else 0,
                      stride_wsg=w_scale.stride(2) if w_scale.dim() > 2 else 0)
    else:
        scales = dict(a_scale_ptr=a, stride_asm=0, stride_asg=0, w_scale_ptr=a, stride_wse=0, stride_wsn=0,
                      stride_wsg=0)
    _grouped_gemm_kernel[grid](
        a, w, bias if bias is not None else w, out, rows, tile_expert, pairs, experts, n, k,
        a.stride(0), *w.stride(), bias.stride(0) if bias is not None else 0, out.stride(0), **scales,
        TOP_K=top_k, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=group or BLOCK_K,
        INTERPRET=not a.is_cuda, FP8=fp8, GROUPED=group > 0, W_SCALE=w_scale.dim() if fp8 else 0,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def _tiles(topk_ids: torch.Tensor, tokens: int, experts: int) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """(top_k, pairs, block_m, rows, tile_expert) of one MoE call."""
    top_k = topk_ids.shape[-1]
    pairs = tokens * top_k
    block_m = 16 if pairs <= FEW_PAIRS_PER_EXPERT * experts else 64
    return top_k, pairs, block_m, *expert_tiles(topk_ids, experts, block_m)


def _weighted_sum(down: torch.Tensor, topk_weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each pair's expert output times its routing weight, summed over the slots in float32; x's dtype and shape."""
    top_k = topk_weights.shape[-1]
    weighted = down.view(-1, top_k, down.shape[-1]).float() * topk_weights.reshape(-1, top_k, 1).float()
    return weighted.sum(1).to(x.dtype).view(x.shape)


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
        w_down: torch.Tensor, activation: str, b_gate_up: torch.Tensor | None = None,
        b_down: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `torch.ops.autodeploy.moe`."""
    dtypes = {x.dtype, w_gate_up.dtype, w_down.dtype}
    if len(dtypes) > 1 or x.dtype not in (torch.bfloat16, torch.float16) or x.numel() == 0:
        return moe_reference(x, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down)
    tokens = as_rows(x)
    top_k, pairs, block_m, rows, tile_expert = _tiles(topk_ids, tokens.shape[0], w_gate_up.shape[0])
    gate_up = grouped_gemm(tokens, w_gate_up, b_gate_up, rows, tile_expert, pairs, top_k, block_m)
    hidden = gated_act(*split_gate_up(gate_up, activation), activation)
    down = grouped_gemm(hidden, w_down, b_down, rows, tile_expert, pairs, 1, block_m)
    return _weighted_sum(down, topk_weights, x)


def fp8_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
            w_gate_up_scale: torch.Tensor, w_down: torch.Tensor, w_down_scale: torch.Tensor, activation: str,
            b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
            w_gate_up_input_scale: torch.Tensor | None = None, w_down_input_scale: torch.Tensor | None = None,
            weight_block: int = 0) -> torch.Tensor:
    """Same contract as `torch.ops.autodeploy.fp8_moe`: x quantized per token (and group of `weight_block`) once,
    the grouped e4m3 GEMMs, the activation quantized as it is formed; float32 in between, as the reference.
    Static input scales (one per expert: a token's quantization differs per expert) keep the reference."""
    if (w_gate_up_input_scale is not None or w_down_input_scale is not None or x.numel() == 0
            or x.dtype not in (torch.bfloat16, torch.float16)):
        return fp8_moe_reference(x, topk_ids, topk_weights, w_gate_up, w_gate_up_scale, w_down, w_down_scale,
                                 activation, b_gate_up, b_down, w_gate_up_input_scale, w_down_input_scale,
                                 weight_block)
    group = weight_block or -1
    q, scale = quantize_fp8_per_token(as_rows(x), group)
    top_k, pairs, block_m, rows, tile_expert = _tiles(topk_ids, q.shape[0], w_gate_up.shape[0])
    gemm = partial(grouped_gemm, rows=rows, tile_expert=tile_expert, pairs=pairs, block_m=block_m,
                   group=weight_block, out_dtype=torch.float32)
    gate_up = gemm(q, w_gate_up, b_gate_up, top_k=top_k, a_scale=scale, w_scale=w_gate_up_scale)
    hidden, hidden_scale = gated_act_quant_fp8(*split_gate_up(gate_up, activation), activation, group)
    down = gemm(hidden, w_down, b_down, top_k=1, a_scale=hidden_scale, w_scale=w_down_scale)
    return _weighted_sum(down, topk_weights, x)
