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


_ATTENTION_SCHEMA = str(torch.ops.autodeploy.cached_attention.default._schema)
# the attention's arguments, then the groups: results as quantize_fp8_per_token's
SCHEMA = _ATTENTION_SCHEMA[_ATTENTION_SCHEMA.index("("):_ATTENTION_SCHEMA.rindex(") ->")] + \
    ", SymInt group_size=-1) -> (Tensor, Tensor)"


def _full(args: tuple) -> tuple:
    """A call's arguments with the schema's defaults for the trailing ones the dispatcher leaves out."""
    return (*args, *(a.default_value for a in _ARGUMENTS[len(args):]))


def _reference(*args) -> tuple[Tensor, Tensor]:
    """Reference: the reference attention, then the reference quantization of its [1, T, n_heads * d] view."""
    *attention_args, group_size = _full(args)
    out = torch.ops.autodeploy.cached_attention(*attention_args)
    return torch.ops.autodeploy.quantize_fp8_per_token(out.transpose(1, 2).reshape(1, out.shape[2], -1), group_size)


def _triton(*args) -> tuple[Tensor, Tensor]:
    """Triton backend (same contract): decode steps quantize in the decode kernel's epilogue."""
    *attention_args, group_size = _full(args)
    return triton_attention(*attention_args, quant_group=group_size)


def _fake(*args) -> tuple[Tensor, Tensor]:
    q, _, v, *_, group_size = _full(args)
    return empty_quantized(q.new_empty(1, q.shape[2], q.shape[1] * v.shape[-1]), group_size)


cached_attention_quant_fp8 = torch.library.custom_op("autodeploy::cached_attention_quant_fp8", _reference,
                                                     mutates_args=_MUTATES, schema=SCHEMA)
cached_attention_quant_fp8_triton = torch.library.custom_op("autodeploy::cached_attention_quant_fp8_triton", _triton,
                                                            mutates_args=_MUTATES, schema=SCHEMA)
_ARGUMENTS = torch.ops.autodeploy.cached_attention_quant_fp8.default._schema.arguments
cached_attention_quant_fp8.register_fake(_fake)
cached_attention_quant_fp8_triton.register_fake(_fake)

# the attention op's backend -> the quantizing op of the same backend
QUANTIZING_BACKENDS = {
    torch.ops.autodeploy.cached_attention.default: torch.ops.autodeploy.cached_attention_quant_fp8.default,
    torch.ops.autodeploy.cached_attention_triton.default: torch.ops.autodeploy.cached_attention_quant_fp8_triton.default,
}
