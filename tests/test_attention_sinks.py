"""Attention sinks in the canonical attention ops: the reference against GPT-OSS's own eager attention, the
cached reference against the dense one, and the Triton prefill and decode kernels (interpreter on CPU) against
the reference, with poisoned outputs, one split and several, a sliding window and an fp8 cache."""

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

import autodeploy.kernels  # noqa: F401
from test_cached_attention import MIXED, packed_case
from test_decode_attention import DECODE, _poison

ops = torch.ops.autodeploy


def _sinks(n_heads: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_heads, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("n_heads,n_kv", [(4, 2), (6, 6)])
def test_attention_sinks_match_gpt_oss(n_heads, n_kv):
    g = torch.Generator().manual_seed(n_heads)
    q = torch.randn(2, n_heads, 9, 16, generator=g)
    k, v = (torch.randn(2, n_kv, 9, 16, generator=g) for _ in range(2))
    sinks = _sinks(n_heads)
    mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    module = SimpleNamespace(num_key_value_groups=n_heads // n_kv, sinks=sinks, training=False)
    want, _ = eager_attention_forward(module, q, k, v, mask, 0.25)
    got = ops.attention(q, k, v, 0.25, None, None, None, sinks)
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ops.attention(q, k, v, 0.25), got, atol=1e-3)  # the sinks change the result


def test_cached_reference_sinks_match_dense():
    args, full = packed_case(MIXED, n_heads=6, n_kv=2, head_dim=16, seed=7)
    sinks = _sinks(6)
    out = ops.cached_attention(*args, 0.25, sinks=sinks)
    cu = args[5].tolist()
    for b, (q, k, v) in enumerate(full):
        kr, vr = k.repeat_interleave(3, 0)[None], v.repeat_interleave(3, 0)[None]
        want = ops.attention(q[None], kr, vr, 0.25, None, None, None, sinks)[0]
        torch.testing.assert_close(out[0, :, cu[b]:cu[b + 1]], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs,sliding_window,splits", [
    (MIXED, None, None), (MIXED, 9, None), (DECODE, None, None), (DECODE, 7, None), (DECODE, None, 1),
], ids=["prefill", "prefill-window", "decode", "decode-window", "decode-one-split"])
def test_triton_sinks_match_reference(seqs, sliding_window, splits, monkeypatch):
    from autodeploy.kernels import triton_decode_attention

    _poison(monkeypatch)
    if splits is not None:
        monkeypatch.setattr(triton_decode_attention, "_num_splits", lambda *_: splits)
    args, _ = packed_case(seqs, n_heads=6, n_kv=2, head_dim=32, seed=5)
    sinks = _sinks(6, seed=1)
    ref_args = tuple(a.clone() for a in args)
    want = ops.cached_attention(*ref_args, 0.2, sliding_window, sinks=sinks)
    got = ops.cached_attention_triton(*args, 0.2, sliding_window, sinks=sinks)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["prefill", "decode"])
def test_triton_sinks_with_an_fp8_cache(seqs):
    args, _ = packed_case(seqs, n_heads=4, n_kv=2, head_dim=32, seed=3)
    q, k, v, k_cache, v_cache, *meta = args
    caches = [torch.zeros_like(c, dtype=torch.float8_e4m3fn) for c in (k_cache, v_cache)]
    sinks = _sinks(4, seed=2)
    want = ops.cached_attention(q, k, v, *(c.clone() for c in caches), *meta, 0.2, None, None, None, 0.05, 0.03,
                                sinks=sinks)
    got = ops.cached_attention_triton(q, k, v, *caches, *meta, 0.2, None, None, None, 0.05, 0.03, sinks=sinks)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
