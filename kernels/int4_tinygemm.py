"""`autodeploy::int4_linear_tinygemm`: INT4 weight-only linears at decode through PyTorch's tinygemm.

tinygemm (`aten._weight_int4pack_mm`, bf16 activations, tensor-core tiles) runs a Llama-3.1-8B decode
linear 3-4x faster than our Triton backend at a few rows (H200), but past a few tens of rows it falls far
behind dequantize + cuBLAS. So the op takes the weight copies and picks per call (the row count is fixed
per captured graph): our INT4 GEMV on its interleaved copy up to `gemv_rows` rows when given
(kernels/triton_int_gemv.py, faster than tinygemm at one row), 5-8 rows on the tensor-core GEMV over the
same copy (kernels/triton_int4_mma_gemv.py, faster than tinygemm there), tinygemm up to `max_rows` rows
otherwise, the Triton `int_linear` backend (which reads our layout) beyond.

tinygemm's layout, made once at load time by `tinygemm_weights`:
- codes: uint8 [N, K / 2] with (code of even column << 4) | code of odd column, then
  `_convert_weight_to_int4pack(u8, inner_k_tiles)` (CUDA). Our int32 words hold column 8w + j at bits 4j,
  so on a little-endian machine byte i of word w holds columns 8w + 2i (low nibble) and 8w + 2i + 1:
  tinygemm's bytes are our bytes with their nibbles swapped. On CPU the analogue
  (`_convert_weight_to_int4pack_for_cpu`) takes int32 codes [N, K].
- scales_and_zeros: bf16 [G, N, 2]; tinygemm computes w = (q - 8) * scale + zero_f, ours is
  w = (q - z) * scale, so zero_f = (8 - z) * scale (symmetric: z = 8, zero_f = 0). Rounding zero_f to
  bf16 costs ~4e-3 of the output at most.
"""

from __future__ import annotations

import torch

from .quant_format import unpack_int
from .int_gemv_linear import interleaved_int_linear
from .triton_int4_mma_gemv import MAX_ROWS as MMA_ROWS
from .triton_int4_mma_gemv import int4_mma_gemv, mma_gemv_supported
from .triton_int_gemv import int_gemv

TINYGEMM_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = (8, 4, 2)  # K tiles of 16 columns per inner step; the largest that divides K is the fastest
# From this many rows up to MMA_ROWS the tensor-core GEMV on the GEMV's words beats tinygemm: the 8B layer's four
# linears at 8 rows ~105 against 157 us, INT4 batch 8 1,714 against 1,317 tok/s; at 4 rows tinygemm is ahead (96
# against 103 us) (H200, BENCHMARKS.md session 22)
MMA_FROM_ROWS = 5
SCHEMA = ("(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor packed, Tensor scales_and_zeros, "
          "Tensor? bias=None, int group_size=128, int max_rows=16, Tensor? gemv_words=None, Tensor? gemv_coeffs=None, "
          "int gemv_rows=0, Tensor? columns=None) -> Tensor")


def inner_k_tiles(k: int) -> int | None:
    """The inner_k_tiles tinygemm packs K columns with (16 * tiles must divide K), or None."""
    return next((tiles for tiles in INNER_K_TILES if k % (16 * tiles) == 0), None)


def ineligible(n: int, k: int, group_size: int, g_idx: torch.Tensor | None, dtype: torch.dtype,
               device: torch.device) -> str | None:
    """Why an INT4 linear of [n, k] cannot run on tinygemm (a short report key), or None if it can."""
    if g_idx is not None:
        return "act_order"  # tinygemm's groups are consecutive columns
    if group_size not in TINYGEMM_GROUPS:
        return "group_size"
    if k % group_size or inner_k_tiles(k) is None:
        return "in_features"
    if n % (8 if device.type == "cuda" else 16):  # the CPU packer wants whole 16-row blocks
        return "out_features"
    if dtype != torch.bfloat16:
        return "dtype"
    return None


def nibble_swapped(qweight: torch.Tensor) -> torch.Tensor:
    """Our int32 words [N, K / 8] -> tinygemm's uint8 [N, K / 2] (even column in the high nibble)."""
    u8 = qweight.contiguous().view(torch.uint8)
    return ((u8 & 0x0F) << 4) | (u8 >> 4)


def tinygemm_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our INT4 tensors (eligible: see `ineligible`) -> (packed, scales_and_zeros) for tinygemm on their device."""
    k = qweight.shape[1] * 8
    tiles = inner_k_tiles(k)
    if qweight.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack(nibble_swapped(qweight), tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int(qweight, 4, k), tiles)
    scale = scales.float()
    offset = (8.0 - zeros.float()) * scale if zeros is not None else torch.zeros_like(scale)
    return packed, torch.stack([scale, offset], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


@torch.library.custom_op("autodeploy::int4_linear_tinygemm", mutates_args=(), schema=SCHEMA)
def int4_linear_tinygemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
    max_rows: int = 16,
    gemv_words: torch.Tensor | None = None,
    gemv_coeffs: torch.Tensor | None = None,
    gemv_rows: int = 0,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """int_linear(x, qweight, scales, zeros, bits=4) through our GEMV up to gemv_rows rows (when its copy is
    given; 5-8 rows of bf16 x on CUDA: the tensor-core GEMV on the same words), tinygemm up to max_rows rows, else
    the Triton backend. `columns`: qweight holds the GEMV's re-packed codes (the canonical packing of the weight
    with its columns in this order): past max_rows they go to `interleaved_int_linear` (the tensor-core dot for
    decode batches, else the backend on x's gathered columns)."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if gemv_words is not None and 0 < rows <= gemv_rows:
        return int_gemv(x, gemv_words, gemv_coeffs, bias, group_size, 4)
    if (gemv_words is not None and MMA_FROM_ROWS <= rows <= MMA_ROWS and x.is_cuda
            and mma_gemv_supported(rows, k, group_size, x.dtype)):
        return int4_mma_gemv(x, gemv_words, gemv_coeffs, bias, group_size)
    if not 0 < rows <= max_rows:
        if columns is not None:
            return interleaved_int_linear(x, qweight, columns, scales, zeros, bias, 4, group_size)
        return torch.ops.autodeploy.int_linear_triton(x, qweight, scales, zeros, None, bias, 4, group_size)
    mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    y = mm(x.reshape(rows, k).contiguous(), packed, group_size, scales_and_zeros)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@int4_linear_tinygemm.register_fake
def _(x, qweight, scales, zeros, packed, scales_and_zeros, bias=None, group_size=128, max_rows=16, gemv_words=None,
      gemv_coeffs=None, gemv_rows=0, columns=None):
    torch._check(tuple(scales_and_zeros.shape) == (scales.shape[1], qweight.shape[0], 2),
                 lambda: "scales_and_zeros must be [G, N, 2]")
    if gemv_words is not None:
        torch._check(gemv_words.shape == qweight.shape and tuple(gemv_coeffs.shape) == (*scales.shape, 2),
                     lambda: "gemv_words must be qweight's shape and gemv_coeffs [N, G, 2]")
    return torch.ops.autodeploy.int_linear(x, qweight, scales, zeros, None, bias, 4, group_size)
