"""Triton RoPE (the `rope` and `rope_pair` backends): rotate-half or interleaved, out of place or in place.

x is any strided [b, h, s, d] tensor (q or k straight after the head transpose, which is not
contiguous, or a slice of a fused qkv projection); cos/sin broadcast against it by stride 0. One
program rotates a block of heads of one token: with (first, second) the pair an element is rotated
with ((i, i + d/2) for rotate-half, (2i, 2i + 1) for interleaved), both forms are
  out[first]  = x[first]  * cos[first]  - x[second] * sin[first]
  out[second] = x[second] * cos[second] + x[first]  * sin[second]
Each program loads both elements of its pairs before it stores them, so `out` may be x itself. One kernel
serves both ops: its grid's second axis runs over q's head blocks and then k's (none for `rope`), so a
layer's q and k take one launch.
Math in float32; when x and cos are both half precision, each product is rounded to x's dtype before
the sum, as the eager `x * cos + rotate(x) * sin` rounds (HF's own numbers, not just close to them). The kernels
compile without floating-point contraction (`enable_fp_fusion=False`): with it, the compiler narrowed each
rounded product to a bf16 multiply and fused it with the sum into one bf16 FMA, which skips the product's
rounding (an ulp off HF in a quarter of the elements on an H200).
Imported lazily (`triton.jit` fixes interpreter mode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pdl import pdl_launch, wait_for_inputs

BLOCK_H = 4


@triton.jit
def _at(ptr, b, h, s, dim, s_b, s_h, s_s, s_d):
    """Pointers to elements `dim` of heads h (a column) of token (b, s)."""
    return ptr + b * s_b + h * s_h + s * s_s + dim[None, :] * s_d


@triton.jit
def rounded(x, dtype, ROUND: tl.constexpr):
    """x (float32) rounded to `dtype` and back when ROUND, else x."""
    if ROUND:
        x = x.to(dtype).to(tl.float32)
    return x


@triton.jit
def _rotate_heads(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    sx_b, sx_h, sx_s, sx_d, sc_b, sc_h, sc_s, sc_d, ss_b, ss_h, ss_s, ss_d, so_b, so_h, so_s, so_d,
    n_heads, b, s, head_block,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
    ROUND_PRODUCTS: tl.constexpr,
):
    """Rotate heads head_block * BLOCK_H .. + BLOCK_H of token (b, s)."""
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        first = 2 * pairs
        second = first + 1
    else:
        first = pairs
        second = pairs + HALF
    mask = (heads < n_heads)[:, None] & (pairs < HALF)[None, :]
    h = heads[:, None].to(tl.int64)
    x1 = tl.load(_at(x_ptr, b, h, s, first, sx_b, sx_h, sx_s, sx_d), mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(_at(x_ptr, b, h, s, second, sx_b, sx_h, sx_s, sx_d), mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(_at(cos_ptr, b, h, s, first, sc_b, sc_h, sc_s, sc_d), mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(_at(cos_ptr, b, h, s, second, sc_b, sc_h, sc_s, sc_d), mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(_at(sin_ptr, b, h, s, first, ss_b, ss_h, ss_s, ss_d), mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(_at(sin_ptr, b, h, s, second, ss_b, ss_h, ss_s, ss_d), mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    first_out = rounded(x1 * cos1, dtype, ROUND_PRODUCTS) - rounded(x2 * sin1, dtype, ROUND_PRODUCTS)
    second_out = rounded(x2 * cos2, dtype, ROUND_PRODUCTS) + rounded(x1 * sin2, dtype, ROUND_PRODUCTS)
    tl.store(_at(out_ptr, b, h, s, first, so_b, so_h, so_s, so_d), first_out.to(dtype), mask=mask)
    tl.store(_at(out_ptr, b, h, s, second, so_b, so_h, so_s, so_d), second_out.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, qcos_ptr, qsin_ptr, qout_ptr,
    sq_b, sq_h, sq_s, sq_d, sqc_b, sqc_h, sqc_s, sqc_d, sqs_b, sqs_h, sqs_s, sqs_d, sqo_b, sqo_h, sqo_s, sqo_d,
    k_ptr, kcos_ptr, ksin_ptr, kout_ptr,
    sk_b, sk_h, sk_s, sk_d, skc_b, skc_h, skc_s, skc_d, sks_b, sks_h, sks_s, sks_d, sko_b, sko_h, sko_s, sko_d,
    q_heads, k_heads, q_blocks, seq_len,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
    ROUND_PRODUCTS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """q's head blocks, then k's, along the grid's second axis: one launch for both (one tensor: no k blocks)."""
    wait_for_inputs(USE_PDL)
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    block = tl.program_id(1)
    if block < q_blocks:
        _rotate_heads(q_ptr, qcos_ptr, qsin_ptr, qout_ptr, sq_b, sq_h, sq_s, sq_d, sqc_b, sqc_h, sqc_s, sqc_d,
                      sqs_b, sqs_h, sqs_s, sqs_d, sqo_b, sqo_h, sqo_s, sqo_d, q_heads, b, s, block,
                      HALF, BLOCK_HALF, BLOCK_H, INTERLEAVED, ROUND_PRODUCTS)
    else:
        _rotate_heads(k_ptr, kcos_ptr, ksin_ptr, kout_ptr, sk_b, sk_h, sk_s, sk_d, skc_b, skc_h, skc_s, skc_d,
                      sks_b, sks_h, sks_s, sks_d, sko_b, sko_h, sko_s, sko_d, k_heads, b, s, block - q_blocks,
                      HALF, BLOCK_HALF, BLOCK_H, INTERLEAVED, ROUND_PRODUCTS)


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """A view of t with leading unit dims up to rank 4 (never a copy: `out` must stay aliased)."""
    return t[(None,) * (4 - t.dim())]


def _operands(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> tuple[list, tuple]:
    """The kernel's pointers and strides for one tensor ([b, h, s, d] views, cos/sin broadcast by stride 0),
    and its shape."""
    if x.dim() > 4:
        raise ValueError(f"rope kernel takes x of rank <= 4, got {tuple(x.shape)}")
    x4, o4 = as_4d(x), as_4d(out)
    cos4, sin4 = (as_4d(t).expand(x4.shape) for t in (cos, sin))
    return [x4, cos4, sin4, o4, *x4.stride(), *cos4.stride(), *sin4.stride(), *o4.stride()], tuple(x4.shape)


def round_products(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the eager rotation rounds each product to x's dtype (x and cos both half precision)."""
    return torch.promote_types(x.dtype, cos.dtype) == x.dtype and x.element_size() < 4


def _constants(x: torch.Tensor, cos: torch.Tensor, head_dim: int, interleaved: bool) -> dict:
    return dict(HALF=head_dim // 2, BLOCK_HALF=triton.next_power_of_2(head_dim // 2), BLOCK_H=BLOCK_H,
                INTERLEAVED=interleaved, ROUND_PRODUCTS=round_products(x, cos), enable_fp_fusion=False,
                **pdl_launch(x.device))


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Same contract as `torch.ops.autodeploy.rope` for x of rank <= 4; `out=x` rotates in place."""
    out = torch.empty_like(x) if out is None else out
    args, (batch, n_heads, seq_len, head_dim) = _operands(x, cos, sin, out)
    if x.numel() == 0:
        return out
    blocks = triton.cdiv(n_heads, BLOCK_H)
    _rope_kernel[(batch * seq_len, blocks)](*args, *args, n_heads, 0, blocks, seq_len,
                                            **_constants(x, cos, head_dim, interleaved))
    return out


def rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `torch.ops.autodeploy.rope_pair`: q and k (the same batch, tokens and head size, any
    head counts and strides) rotated in one launch."""
    if (q.dim() != k.dim() or q.dim() < 3 or q.shape[:-3] != k.shape[:-3] or q.shape[-2:] != k.shape[-2:]
            or q.dtype != k.dtype):
        raise ValueError(f"rope_pair: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} differ in more "
                         "than their heads")
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    q_args, (batch, q_heads, seq_len, head_dim) = _operands(q, cos, sin, q_out)
    k_args, k_shape = _operands(k, cos, sin, k_out)
    if q.numel() == 0:
        return q_out, k_out
    q_blocks = triton.cdiv(q_heads, BLOCK_H)
    _rope_kernel[(batch * seq_len, q_blocks + triton.cdiv(k_shape[1], BLOCK_H))](
        *q_args, *k_args, q_heads, k_shape[1], q_blocks, seq_len, **_constants(q, cos, head_dim, interleaved))
    return q_out, k_out
