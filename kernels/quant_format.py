"""The quantized weight formats the canonical quantized ops read, and plain-torch (de)quantizers.

One layout per scheme, so every kernel reads one thing and checkpoint loaders convert to it:
- FP8: float8_e4m3fn weights [N, K] with a float32 scale, per tensor ([]) or per output channel ([N]);
  w = w_fp8 * scale.
- INT4 / INT8 weight-only: unsigned codes packed along K into int32 words, the code of column k in
  word k * bits // 32 at bit (k % (32 // bits)) * bits (compressed-tensors' `pack-quantized` row
  layout: a row's words are contiguous, which is what a skinny GEMM streams). Scales [N, G] per group
  of `group_size` columns (-1 = one group per row); zeros [N, G] in code units, or None for symmetric
  (implicit zero point 2**(bits-1)); w[n, k] = (code - zero[n, g(k)]) * scale[n, g(k)], with
  g(k) = g_idx[k] (GPTQ act-order) or k // group_size.
Quantization here is round-to-nearest, the baseline every format can hold.
"""

from __future__ import annotations

import torch

from autodeploy.errors import QuantizationError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT_BITS = (4, 8)
_MIN_SCALE = 1e-12  # an all-zero row or group still gets a finite, positive scale


def quantize_fp8(w: torch.Tensor, per_channel: bool, combine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], float32 scale [] or [N]) with amax mapped to 448.
    One float32 working copy of w at a time (loaders quantize tensor by tensor within a memory bound).
    `combine(amax, "max")`: the amax over the other ranks' slices of K too (a row-parallel shard)."""
    dims = (-1,) if per_channel else tuple(range(w.dim()))
    amax = torch.maximum(w.amax(dim=dims), -w.amin(dim=dims)).float()
    if combine is not None:
        amax = combine(amax, "max")
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    scaled = w.to(torch.float32, copy=True)
    scaled.div_(scale[:, None] if per_channel else scale).clamp_(-FP8_MAX, FP8_MAX)
    return scaled.to(FP8_DTYPE), scale


def quantize_fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], float32 scale [ceil(N / block), ceil(K / block)]): one scale per
    block x block tile (the last row and column of tiles short), its amax mapped to 448 (DeepSeek-V3's weights)."""
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    padded = torch.nn.functional.pad(w.float().abs(), (0, cols * block - k, 0, rows * block - n))
    amax = padded.reshape(rows, block, cols, block).amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    scaled = (w.float() / block_columns(scale, block, n, k)).clamp_(-FP8_MAX, FP8_MAX)
    return scaled.to(FP8_DTYPE), scale


def block_columns(scale: torch.Tensor, block: int, n: int, k: int) -> torch.Tensor:
    """Block scales [ceil(n / block), ceil(k / block)] spread over the [n, k] weight they scale."""
    return scale.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: int = -1) -> torch.Tensor:
    """float8 w [N, K] with a scale [] or [N], or [N / block, K / block] block scales -> float32 [N, K]."""
    scale = scale.float()
    if scale.dim() == 2:
        return w.float() * block_columns(scale, block, *w.shape)
    return w.float() * (scale[:, None] if scale.dim() == 1 else scale)


def groups_of(k: int, group_size: int) -> int:
    """How many scale groups a row of `k` columns has; a group size that does not divide k is an error."""
    if group_size == -1:
        return 1
    if group_size <= 0 or k % group_size:
        raise QuantizationError(f"group size {group_size} does not divide in_features {k} (use a divisor or -1)")
    return k // group_size


def check_bits(bits: int, k: int) -> None:
    """Supported widths, and whole int32 words per row."""
    if bits not in INT_BITS:
        raise QuantizationError(f"{bits}-bit weights are not supported (supported: {', '.join(map(str, INT_BITS))})")
    if k % (32 // bits):
        raise QuantizationError(f"in_features {k} is not a multiple of {32 // bits}, the {bits}-bit codes per int32")


def quantize_int(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [N, K] -> (qweight int32 [N, K*bits/32], scales [N, G] in w's dtype, zeros [N, G] | None).

    Symmetric: scale = amax / (2**(bits-1) - 1), codes = round(w / scale) + 2**(bits-1) (the lowest
    code stays unused, so +-amax are both exact). Asymmetric: [min, max] mapped onto all 2**bits codes.
    Codes are rounded against the scale as stored (in w's dtype), so dequantization sees what was meant.
    """
    n, k = w.shape
    check_bits(bits, k)
    g = groups_of(k, group_size)
    out_dtype = w.dtype if w.dtype.is_floating_point and w.element_size() >= 2 else torch.float32
    wg = w.reshape(n, g, k // g)
    top = 2**bits - 1
    lo, hi = wg.amin(-1).float(), wg.amax(-1).float()
    if symmetric:
        scale = (torch.maximum(hi, -lo) / (2 ** (bits - 1) - 1)).clamp(min=_MIN_SCALE).to(out_dtype)
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.float32)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / top).clamp(min=_MIN_SCALE).to(out_dtype)
        zero = (-lo / scale.float()).round().clamp(0, top)
    codes = wg.to(torch.float32, copy=True)  # the one full-size working copy, updated in place
    codes.div_(scale.float()[..., None]).round_().add_(zero[..., None]).clamp_(0, top)
    qweight = pack_int(codes.reshape(n, k), bits)
    return qweight, scale, None if symmetric else zero.to(out_dtype)


def pack_int(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] (0 .. 2**bits - 1, any integer or integral float dtype) -> int32
    [N, K*bits/32], packed along K (layout above). Works one code slot at a time, so the temporaries
    are a fraction of the codes' size."""
    n, k = codes.shape
    check_bits(bits, k)
    per_word = 32 // bits
    slots = codes.reshape(n, k // per_word, per_word)
    words = torch.zeros(n, k // per_word, dtype=torch.int64, device=codes.device)
    for slot in range(per_word):
        words |= slots[..., slot].to(torch.int64) << (slot * bits)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 [N, K*bits/32] -> unsigned codes int32 [N, K]."""
    check_bits(bits, k)
    per_word = 32 // bits
    if qweight.shape[-1] * per_word != k:
        raise QuantizationError(f"qweight has {qweight.shape[-1]} words per row, {k} {bits}-bit columns need {k // per_word}")
    shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits
    return ((qweight[..., None] >> shifts) & (2**bits - 1)).reshape(*qweight.shape[:-1], k)


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """g(k) for every column: g_idx when given (act-order), else k // group_size (0 per channel)."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    if group_size == -1:
        return torch.zeros(k, dtype=torch.long, device=device)
    return torch.arange(k, device=device) // group_size


def dequantize_int(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
) -> torch.Tensor:
    """Packed codes with their scales / zeros -> float32 [N, K] (the formula in the module docstring)."""
    if g_idx is None:
        groups_of(k, group_size)
    g = group_index(k, group_size, g_idx, qweight.device)
    codes = unpack_int(qweight, bits, k).float()
    zero = zeros.float()[:, g] if zeros is not None else float(2 ** (bits - 1))
    return (codes - zero) * scales.float()[:, g]
