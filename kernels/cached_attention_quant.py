"""Paged attention whose output comes out quantized for an FP8 o projection: `cached_attention_quant_fp8`.

FP8 W8A8 quantizes the o projection's input, the attention output [1, T, n_heads * d], per token and group
of `group_size` columns (`fuse_fp8_act_quant`): a kernel of its own per layer after the attention (H200,
Llama-3.1-8B: ~1.3 us at batch 1, ~1.8 at batch 64). When the groups are the heads (group_size == the
value head dim) the decode kernel already holds each group whole in its epilogue, so it writes e4m3 and the
scales there instead of the bf16 output (`fuse_attention_quant_fp8`). Same arguments as `cached_attention`
plus `group_size`; results as `quantize_fp8_per_token(attention.transpose(1, 2).reshape(1, T, -1))`, bit
for bit: the output is rounded to its dtype first, as the unfused graph stores it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cached_attention import _MUTATES, triton_attention
from .quant_act import empty_quantized


@torch.library.custom_op("autodeploy::cached_attention_quant_fp8", mutates_args=_MUTATES)
def cached_attention_quant_fp8(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    cu_seqlens: Tensor, seq_lens: Tensor, block_tables: Tensor, slot_mapping: Tensor,
    scale: float, sliding_window: int | None = None, logit_cap: float | None = None,
    alibi_slopes: Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
    rope_cos: Tensor | None = None, rope_sin: Tensor | None = None, rope_interleaved: bool = False,
    group_size: int = -1,
) -> tuple[Tensor, Tensor]:
    """Reference: the reference attention, then the reference quantization of its [1, T, n_heads * d] view."""
    out = torch.ops.autodeploy.cached_attention(q, k, v, k_cache, v_cache, cu_seqlens, seq_lens, block_tables,
                                                slot_mapping, scale, sliding_window, logit_cap, alibi_slopes, k_scale,
                                                v_scale, rope_cos, rope_sin, rope_interleaved)
    return torch.ops.autodeploy.quantize_fp8_per_token(out.transpose(1, 2).reshape(1, out.shape[2], -1), group_size)


def _triton(*args) -> tuple[Tensor, Tensor]:
    """Triton backend (same contract; the reference's schema): decode steps quantize in the decode kernel's
    epilogue."""
    *attention_args, group_size = args
    return triton_attention(*attention_args, quant_group=group_size)


_schema = str(torch.ops.autodeploy.cached_attention_quant_fp8.default._schema)
cached_attention_quant_fp8_triton = torch.library.custom_op(
    "autodeploy::cached_attention_quant_fp8_triton", _triton, mutates_args=_MUTATES, schema=_schema[_schema.index("("):])


def _fake(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens: Tensor, seq_lens: Tensor,
          block_tables: Tensor, slot_mapping: Tensor, scale: float, sliding_window: int | None = None,
          logit_cap: float | None = None, alibi_slopes: Tensor | None = None, k_scale: float = 1.0,
          v_scale: float = 1.0, rope_cos: Tensor | None = None, rope_sin: Tensor | None = None,
          rope_interleaved: bool = False, group_size: int = -1) -> tuple[Tensor, Tensor]:
    return empty_quantized(q.new_empty(1, q.shape[2], q.shape[1] * v.shape[-1]), group_size)


cached_attention_quant_fp8.register_fake(_fake)
cached_attention_quant_fp8_triton.register_fake(_fake)

# the attention op's backend -> the quantizing op of the same backend
QUANTIZING_BACKENDS = {
    torch.ops.autodeploy.cached_attention.default: torch.ops.autodeploy.cached_attention_quant_fp8.default,
    torch.ops.autodeploy.cached_attention_triton.default: torch.ops.autodeploy.cached_attention_quant_fp8_triton.default,
}
