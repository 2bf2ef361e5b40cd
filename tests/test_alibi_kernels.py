"""ALiBi in the canonical attention ops: the references against HF Bloom's own ALiBi tensor, and the
Triton prefill and decode kernels (interpreter on CPU) against the reference, with poisoned outputs."""

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.attention import causal_mask
from test_cached_attention import MIXED, packed_case
from test_decode_attention import DECODE, _poison


def hf_slopes(n_heads: int) -> torch.Tensor:
    """Bloom's slopes, read back from its ALiBi tensor (slope_h * key position) at position 1."""
    alibi = build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)  # [n_heads, 1, 2]
    return alibi[:, 0, 1]


def bloom_style_attention(q, k, v, scale, n_heads):
    """Bloom's eager math on [h, s, d]: alibi (slope * absolute key position) + scale * q k^T, masked."""
    s = q.shape[1]
    alibi = build_alibi_tensor(torch.ones(1, s), n_heads, torch.float32)  # [h, 1, s]
    scores = alibi + scale * q @ k.transpose(1, 2)
    scores = scores.masked_fill(~causal_mask(s, s, None, q.device), torch.finfo(torch.float32).min)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("n_heads", [3, 8])  # 3: not a power of two (Bloom's extra slopes)
def test_attention_alibi_matches_bloom(n_heads):
    g = torch.Generator().manual_seed(n_heads)
    q, k, v = (torch.randn(1, n_heads, 11, 16, generator=g) for _ in range(3))
    got = torch.ops.autodeploy.attention(q, k, v, 0.25, None, None, hf_slopes(n_heads))
    want = bloom_style_attention(q[0], k[0], v[0], 0.25, n_heads)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    plain = torch.ops.autodeploy.attention(q, k, v, 0.25)
    assert not torch.allclose(plain, got, atol=1e-3)  # the slopes change the result


def test_cached_reference_alibi_matches_dense():
    args, full = packed_case(MIXED, n_heads=6, n_kv=2, head_dim=16, seed=7)
    slopes = hf_slopes(6)
    out = torch.ops.autodeploy.cached_attention(*args, 0.25, None, None, slopes)
    cu = args[5].tolist()
    for b, (q, k, v) in enumerate(full):
        kr, vr = k.repeat_interleave(3, 0)[None], v.repeat_interleave(3, 0)[None]
        want = torch.ops.autodeploy.attention(q[None], kr, vr, 0.25, None, None, slopes)[0]
        torch.testing.assert_close(out[0, :, cu[b]:cu[b + 1]], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs,sliding_window", [(MIXED, None), (MIXED, 9), (DECODE, None), (DECODE, 7)],
                         ids=["prefill", "prefill-window", "decode", "decode-window"])
def test_triton_alibi_matches_reference(seqs, sliding_window, monkeypatch):
    _poison(monkeypatch)
    args, _ = packed_case(seqs, n_heads=6, n_kv=2, head_dim=32, seed=5)
    slopes = hf_slopes(6)
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, 0.2, sliding_window, None, slopes)
    got = torch.ops.autodeploy.cached_attention_triton(*args, 0.2, sliding_window, None, slopes)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
