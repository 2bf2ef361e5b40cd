"""The decode-only Triton path (kernels/triton_decode_attention.py, interpreter on CPU) against the
reference `cached_attention`: steps where every sequence runs one token (T == B), GQA groups 1/4/8,
head dims 64/128, contexts crossing cache-block boundaries, split-K and single-pass, window and cap."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

import autodeploy.kernels  # noqa: F401
from test_cached_attention import packed_case

# (cached, new=1): contexts 1, 16 (block edge), 17, 33, 64+, odd lengths
DECODE = [(0, 1), (15, 1), (16, 1), (32, 1), (70, 1), (4, 1)]


def _poison(monkeypatch):
    """Every new output buffer starts as NaN, so an unwritten element fails the comparison."""
    from autodeploy.kernels import triton_decode_attention as mod

    real = torch.Tensor.new_empty

    def new_empty(self, *shape, **kw):
        out = real(self, *shape, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    return mod


def _check(seqs, n_heads, n_kv, head_dim, seed, sliding_window=None, logit_cap=None, num_splits=None,
           dtype=torch.float32, num_blocks=64, device=DEVICE):
    from autodeploy.kernels.triton_decode_attention import decode_attention, write_kv_cache

    args, _ = packed_case(seqs, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, seed=seed, num_blocks=num_blocks)
    args = tuple((a.to(dtype) if a.is_floating_point() else a).to(device) for a in args)
    scale = head_dim ** -0.5
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, scale, sliding_window, logit_cap)
    if num_splits is None:
        got = torch.ops.autodeploy.cached_attention_triton(*args, scale, sliding_window, logit_cap)
    else:
        q, k, v, k_cache, v_cache, cu, lens, tables, slots = args
        write_kv_cache(k, v, k_cache, v_cache, slots)
        got = decode_attention(q, k_cache, v_cache, lens, tables, scale, sliding_window, logit_cap, num_splits)
    assert not got.isnan().any()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(args[3], ref_args[3])  # both wrote the same cache
    torch.testing.assert_close(args[4], ref_args[4])


@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (8, 64), (4, 64)])
def test_decode_matches_reference(group, head_dim, monkeypatch):
    _poison(monkeypatch)
    n_kv = 2 if group < 8 else 1
    _check(DECODE, n_kv * group, n_kv, head_dim, seed=group + head_dim)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_single_pass_and_split(num_splits, monkeypatch):
    _poison(monkeypatch)
    _check([(100, 1), (0, 1), (47, 1)], 8, 2, 64, seed=11, num_splits=num_splits)


@pytest.mark.parametrize("sliding_window,logit_cap", [(7, None), (None, 20.0), (33, 10.0)])
def test_decode_window_and_cap(sliding_window, logit_cap, monkeypatch):
    _poison(monkeypatch)
    _check(DECODE, 8, 2, 64, seed=3, sliding_window=sliding_window, logit_cap=logit_cap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 dots are wrong under the CPU interpreter (the other kernel's too)")
@pytest.mark.parametrize("seqs", [[(40, 1), (9, 1)], [(200, 1)] * 64, [(1000, 1)]])
def test_decode_bf16_gpu(seqs):
    _check(seqs, 32, 8, 128, seed=5, dtype=torch.bfloat16, num_blocks=len(seqs) * 70, device="cuda")


def test_kv_write_matches_index_copy():
    """The Triton cache write on a mixed (prefill + decode) batch with strided k/v (a fused QKV view)."""
    from autodeploy.kernels.cached_attention import write_kv_cache as ref_write
    from autodeploy.kernels.triton_decode_attention import write_kv_cache

    args, _ = packed_case([(0, 9), (16, 1), (3, 20)], n_heads=4, n_kv=2, head_dim=32, seed=7)
    args = tuple(a.to(DEVICE) for a in args)
    _, k, v, k_cache, v_cache, *_, slots = args
    qkv = torch.cat([torch.randn_like(k), k, v], dim=1)  # [1, 3*n_kv, T, d]: k and v are views
    k_view, v_view = qkv[:, 2:4], qkv[:, 4:6]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref_write(k_view, v_view, want_k, want_v, slots)
    write_kv_cache(k_view, v_view, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)
