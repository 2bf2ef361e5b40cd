"""Reference implementations of the canonical ops against independent computations.

The independent side is transformers' own code where it exists (mask functions, eager attention,
apply_rotary_pos_emb, RMSNorm modules, ACT2FN), so the canonical ops are checked against the
semantics of the models they replace, including HF's sliding-window off-by-one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rope
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm, eager_attention_forward
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb as llama_rope

import autodeploy.kernels  # noqa: F401

ops = torch.ops.autodeploy


def _hf_mask(s: int, sliding_window: int | None) -> torch.Tensor:
    """Additive [1, 1, s, s] mask from transformers' mask functions."""
    fn = causal_mask_function if sliding_window is None else sliding_window_causal_mask_function(sliding_window)
    q_idx, kv_idx = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = fn(0, 0, q_idx, kv_idx)
    return torch.zeros(s, s).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


# (batch, n_heads, n_kv_heads, seq, head_dim, v_head_dim): GQA ratios 1/4/8, head dims 64/80, s = 1/7
ATTENTION_SHAPES = [
    (1, 4, 4, 1, 64, 64),
    (2, 4, 4, 7, 80, 80),
    (2, 8, 2, 7, 64, 64),
    (1, 8, 1, 7, 80, 80),
    (2, 8, 1, 1, 64, 64),
    (1, 4, 1, 13, 16, 24),  # v head dim != q/k head dim
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("sliding_window", [None, 1, 3])
@pytest.mark.parametrize("logit_cap", [None, 5.0])
def test_attention_matches_hf_eager(shape, sliding_window, logit_cap) -> None:
    b, h, h_kv, s, d, d_v = shape
    gen = torch.Generator().manual_seed(hash((shape, sliding_window, logit_cap)) % 2**31)
    q = torch.randn(b, h, s, d, generator=gen) * 2
    k = torch.randn(b, h_kv, s, d, generator=gen) * 2
    v = torch.randn(b, h_kv, s, d_v, generator=gen)
    scale = d**-0.5
    module = SimpleNamespace(num_key_value_groups=h // h_kv, head_dim=d, training=False)
    want, _ = eager_attention_forward(
        module, q, k, v, _hf_mask(s, sliding_window), scaling=scale, softcap=logit_cap
    )
    got = ops.attention(q, k, v, scale, sliding_window, logit_cap)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_attention_keeps_dtype_and_computes_in_fp32() -> None:
    q, k, v = (torch.randn(1, 4, 5, 16, dtype=torch.bfloat16) for _ in range(3))
    got = ops.attention(q, k, v, 0.25)
    want = ops.attention(q.float(), k.float(), v.float(), 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2)


@pytest.mark.parametrize("s,d", [(1, 64), (7, 80), (13, 16)])
def test_rope_rotate_half_matches_llama(s: int, d: int) -> None:
    q, k = torch.randn(2, 4, s, d), torch.randn(2, 2, s, d)
    freqs = torch.randn(2, s, d // 2)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    want_q, want_k = llama_rope(q, k, cos, sin)
    torch.testing.assert_close(ops.rope(q, cos[:, None], sin[:, None]), want_q)
    torch.testing.assert_close(ops.rope(k, cos[:, None], sin[:, None]), want_k)


@pytest.mark.parametrize("s,d", [(1, 64), (7, 80)])
def test_rope_interleaved_matches_gptj_and_cohere(s: int, d: int) -> None:
    freqs = torch.randn(2, s, d // 2)
    cos, sin = freqs.cos(), freqs.sin()
    # GPT-J: [b, s, h, d] layout, half-size cos/sin repeat_interleave'd inside.
    x = torch.randn(2, s, 4, d)
    cos_i, sin_i = (t.repeat_interleave(2, -1)[:, :, None] for t in (cos, sin))
    torch.testing.assert_close(ops.rope(x, cos_i, sin_i, True), gptj_rope(x, sin, cos))
    # Cohere: [b, h, s, d] layout, cos/sin built as repeat_interleave(freqs, 2).
    q, k = torch.randn(2, 4, s, d), torch.randn(2, 2, s, d)
    cos_c, sin_c = freqs.repeat_interleave(2, -1).cos(), freqs.repeat_interleave(2, -1).sin()
    want_q, want_k = cohere_rope(q, k, cos_c, sin_c)
    torch.testing.assert_close(ops.rope(q, cos_c[:, None], sin_c[:, None], True), want_q)
    torch.testing.assert_close(ops.rope(k, cos_c[:, None], sin_c[:, None], True), want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 80), (2, 3, 4, 16)])
def test_rms_norm_matches_llama(shape, dtype) -> None:
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = torch.randn(shape[-1])
    norm.to(dtype)
    x = torch.randn(shape, dtype=dtype) * 3
    got = ops.rms_norm(x, norm.weight, 1e-5)
    assert got.dtype == dtype
    torch.testing.assert_close(got, norm(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_gemma_weight_expression_matches_gemma(dtype) -> None:
    """Gemma multiplies by the fp32 (1 + weight) before casting back: what the matcher passes."""
    norm = Gemma2RMSNorm(80, eps=1e-6)
    norm.weight.data = torch.randn(80)
    norm.to(dtype)
    x = torch.randn(2, 7, 80, dtype=dtype)
    got = ops.rms_norm(x, 1.0 + norm.weight.float(), 1e-6)
    torch.testing.assert_close(got, norm(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "activation,hf_name", [("silu", "silu"), ("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh"), ("relu", "relu")]
)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 80)])
def test_gated_act_matches_hf_activations(activation: str, hf_name: str, shape) -> None:
    gate, up = torch.randn(shape) * 3, torch.randn(shape)
    torch.testing.assert_close(ops.gated_act(gate, up, activation), ACT2FN[hf_name](gate) * up)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (2, 7, 80)])
def test_linear_matches_matmul(shape, bias: bool) -> None:
    x, w = torch.randn(shape), torch.randn(48, shape[-1])
    b = torch.randn(48) if bias else None
    want = x @ w.T + (b if bias else 0)
    torch.testing.assert_close(ops.linear(x, w, b), want, rtol=1e-5, atol=1e-5)


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


@pytest.mark.parametrize(
    "call,shape",
    [
        (
            lambda: ops.attention(_meta(2, 8, 7, 80), _meta(2, 2, 7, 80), _meta(2, 2, 7, 48), 0.1, 3, 30.0),
            (2, 8, 7, 48),
        ),
        (lambda: ops.rope(_meta(2, 4, 7, 64), _meta(2, 1, 7, 64), _meta(2, 1, 7, 64), True), (2, 4, 7, 64)),
        (lambda: ops.rms_norm(_meta(2, 7, 80), _meta(80, dtype=torch.float32), 1e-6), (2, 7, 80)),
        (lambda: ops.gated_act(_meta(2, 7, 96), _meta(2, 7, 96), "gelu_tanh"), (2, 7, 96)),
        (lambda: ops.linear(_meta(2, 7, 80), _meta(96, 80), _meta(96)), (2, 7, 96)),
        (lambda: ops.gated_linear(_meta(2, 7, 80), _meta(2, 7, 80), _meta(96, 80), None, "silu"), (2, 7, 96)),
        (lambda: ops.add_rms_norm_linear(_meta(2, 7, 80), _meta(2, 7, 80), _meta(80), 1e-6, _meta(96, 80), None)[0],
         (2, 7, 96)),
    ],
    ids=["attention", "rope", "rms_norm", "gated_act", "linear", "gated_linear", "add_rms_norm_linear"],
)
def test_fake_impls_on_meta(call, shape) -> None:
    out = call()
    assert out.device.type == "meta" and tuple(out.shape) == shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "op,args",
    [
        (ops.attention.default, (*(torch.randn(1, h, 5, 16) for h in (4, 2)), torch.randn(1, 2, 5, 8), 0.25, 2, 10.0)),
        (ops.rope.default, (torch.randn(1, 2, 5, 16), *(torch.randn(1, 1, 5, 16) for _ in range(2)), False)),
        (ops.rms_norm.default, (torch.randn(3, 5, 16), torch.randn(16), 1e-6)),
        (ops.gated_act.default, (torch.randn(3, 16), torch.randn(3, 16), "silu")),
        (ops.linear.default, (torch.randn(3, 16), torch.randn(8, 16), torch.randn(8))),
        (ops.gated_linear.default, (*torch.randn(3, 32).chunk(2, dim=-1), torch.randn(8, 16), torch.randn(8), "relu")),
        (ops.add_rms_norm_linear.default,
         (torch.randn(3, 16), torch.randn(3, 16), torch.randn(16), 1e-6, torch.randn(8, 16), torch.randn(8))),
    ],
    ids=["attention", "rope", "rms_norm", "gated_act", "linear", "gated_linear", "add_rms_norm_linear"],
)
def test_opcheck(op, args) -> None:
    """torch.library's own consistency checks: schema, fake impl vs real, export-ability."""
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
