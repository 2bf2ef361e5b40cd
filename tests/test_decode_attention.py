"""The decode-only Triton path (kernels/triton_decode_attention.py, interpreter on CPU) against the
reference `cached_attention`: steps where every sequence runs one token (T == B), GQA groups 1/4/8,
head dims 64/128, contexts crossing cache-block boundaries, split-K and single-pass, window and cap;
and the fused form cached_attention_triton runs (the kernel writes this step's k/v and merges its
splits itself) on odd shapes, page sizes, fp8 caches and ALiBi, twice on the same buffers."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import FP8_DTYPE
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


def _fused_case(ctxs, n_heads, n_kv, head_dim, page, seed, dtype, fp8, k_scale, v_scale, device):
    """A decode step over random caches (every slot holds something, so a stray write shows): q/k/v
    strided views of one fused QKV tensor, shuffled blocks of `page` tokens, each sequence's new token
    at position ctx - 1. Returns the op's arguments (q, k, v, k_cache, v_cache, cu, lens, tables, slots)."""
    g = torch.Generator().manual_seed(seed)
    num_seqs, max_blocks = len(ctxs), max(-(-c // page) for c in ctxs)
    caches = [torch.randn(num_seqs * max_blocks + 1, page, n_kv, head_dim, generator=g) for _ in range(2)]
    if fp8:
        caches = [(c / s).clamp(-448, 448).to(FP8_DTYPE) for c, s in zip(caches, (k_scale, v_scale))]
    else:
        caches = [c.to(dtype) for c in caches]
    tables = torch.randperm(num_seqs * max_blocks, generator=g).view(num_seqs, max_blocks).int()
    slots = torch.tensor([int(tables[b, (c - 1) // page]) * page + (c - 1) % page for b, c in enumerate(ctxs)])
    qkv = torch.randn(1, num_seqs, n_heads + 2 * n_kv, head_dim, generator=g).to(dtype).transpose(1, 2)
    q, k, v = qkv[:, :n_heads], qkv[:, n_heads:n_heads + n_kv] * 3, qkv[:, n_heads + n_kv:]  # * 3: fp8 saturates
    args = (q, k, v, *caches, torch.arange(num_seqs + 1, dtype=torch.int32), torch.tensor(ctxs, dtype=torch.int32),
            tables, slots)
    return tuple(a.to(device) for a in args)


def _check_fused(ctxs, n_heads, n_kv, head_dim, page=16, seed=0, sliding_window=None, logit_cap=None, alibi=False,
                 fp8=False, num_splits=None, dtype=torch.float32, device=DEVICE, merge_in_kernel=True):
    """decode_attention with this step's k/v (the fused cache write, and with more than one split
    the in-kernel merge) against the reference, twice on the same buffers: same outputs, whole caches
    equal to the reference's, split counters back to zero."""
    from autodeploy.kernels import triton_decode_attention as mod

    k_scale, v_scale = (0.02, 0.05) if fp8 else (1.0, 1.0)
    args = _fused_case(ctxs, n_heads, n_kv, head_dim, page, seed, dtype, fp8, k_scale, v_scale, device)
    q, k, v, k_cache, v_cache, cu, lens, tables, slots = args
    slopes = torch.linspace(-0.5, -0.01, n_heads, device=device) if alibi else None
    scale = head_dim ** -0.5
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, scale, sliding_window, logit_cap, slopes, k_scale, v_scale)
    outs = []
    for _ in range(2):
        outs.append(mod.decode_attention(q, k_cache, v_cache, lens, tables, scale, sliding_window, logit_cap,
                                         num_splits, alibi_slopes=slopes, k_scale=k_scale, v_scale=v_scale,
                                         k=k, v=v, slot_mapping=slots, merge_in_kernel=merge_in_kernel))
        for cache, ref_cache in ((k_cache, ref_args[3]), (v_cache, ref_args[4])):
            assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
        counters = mod._SPLIT_COUNTERS.get(q.device)
        assert counters is None or not counters.any()
    assert not outs[0].isnan().any()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0], want, atol=tol, rtol=tol)
    assert torch.equal(outs[0], outs[1])


# (contexts, n_heads, n_kv, head_dim, page, extra): in the interpreter, 1 sequence x 1 KV head runs 16
# splits, 3 x 2 runs 4; contexts 5 and 70 leave splits empty; a window of 7 leaves one split in use
FUSED = [
    ([70], 4, 1, 64, 16, {}),
    ([5, 70, 33], 6, 2, 32, 7, {}),
    ([17, 1, 40], 2, 2, 32, 5, {"sliding_window": 7}),
    ([50, 9], 5, 1, 16, 16, {"fp8": True}),
    ([60, 3, 29], 6, 2, 32, 16, {"fp8": True, "sliding_window": 20, "logit_cap": 10.0}),
    ([33, 64], 8, 2, 32, 16, {"alibi": True}),
    ([20, 45, 3], 4, 2, 32, 9, {"num_splits": 1}),
]


@pytest.mark.parametrize("ctxs,n_heads,n_kv,head_dim,page,extra", FUSED)
def test_fused_kv_write_and_merge(ctxs, n_heads, n_kv, head_dim, page, extra, monkeypatch):
    _poison(monkeypatch)
    _check_fused(ctxs, n_heads, n_kv, head_dim, page, seed=len(ctxs) + head_dim + page, **extra)


@pytest.mark.parametrize("ctxs,n_heads,n_kv,head_dim,page,extra", FUSED[:2])
def test_fused_kv_write_with_the_reduce_kernel(ctxs, n_heads, n_kv, head_dim, page, extra, monkeypatch):
    """The default (IN_KERNEL_MERGE off): the fused cache write, the splits merged by the second kernel."""
    _poison(monkeypatch)
    _check_fused(ctxs, n_heads, n_kv, head_dim, page, seed=len(ctxs) + head_dim + page, merge_in_kernel=False,
                 **extra)


def test_decode_step_launches_no_separate_kv_write(monkeypatch):
    """cached_attention_triton on a decode-only step leaves the cache write to the decode kernel."""
    from autodeploy.kernels import triton_decode_attention as mod

    def no_write(*args, **kwargs):
        raise AssertionError("decode-only steps write the cache inside the decode kernel")

    monkeypatch.setattr(mod, "write_kv_cache", no_write)
    args = _fused_case([9, 40], 4, 2, 32, 16, 1, torch.float32, False, 1.0, 1.0, DEVICE)
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, 0.2)
    got = torch.ops.autodeploy.cached_attention_triton(*args, 0.2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert torch.equal(args[3], ref_args[3]) and torch.equal(args[4], ref_args[4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("batch,ctx", [(1, 256), (1, 4096), (64, 256), (64, 4096)])
def test_fused_decode_gpu_8b_shape(batch, ctx, fp8):
    """Llama-3.1-8B's decode attention (32 / 8 heads, d 128, bf16): at batch 1 the merge runs in-kernel
    over 32 splits; at batch 64 a single pass. Contexts differ per sequence."""
    ctxs = [ctx - 37 * b % 200 for b in range(batch)]
    for merge_in_kernel in (True, False):
        _check_fused(ctxs, 32, 8, 128, seed=batch + ctx, fp8=fp8, dtype=torch.bfloat16, device="cuda",
                     merge_in_kernel=merge_in_kernel)


def _rope_tables(positions: torch.Tensor, head_dim: int, interleaved: bool, dtype: torch.dtype):
    """HF-style cos / sin [1, 1, T, d] for `positions` (rotate-half: cat(f, f); interleaved: each f twice)."""
    freqs = positions.float()[:, None] / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return freqs.cos().to(dtype)[None, None], freqs.sin().to(dtype)[None, None]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("ctxs,n_heads,n_kv,head_dim,extra", [
    ([70, 5, 33], 6, 2, 32, {}),
    ([50, 9], 4, 1, 16, {"fp8": True}),
    ([20, 45], 4, 2, 32, {"num_splits": 1}),
])
def test_decode_rotates_q_and_k(ctxs, n_heads, n_kv, head_dim, extra, interleaved, monkeypatch):
    """decode_attention with `rope` (fuse_rope_attention's form) against the reference op rotating first: the
    same outputs and the same rotated keys in the cache, bit for bit."""
    from autodeploy.kernels import triton_decode_attention as mod

    _poison(monkeypatch)
    fp8 = extra.get("fp8", False)
    k_scale, v_scale = (0.02, 0.05) if fp8 else (1.0, 1.0)
    args = _fused_case(ctxs, n_heads, n_kv, head_dim, 16, len(ctxs), torch.float32, fp8, k_scale, v_scale, DEVICE)
    q, k, v, k_cache, v_cache, cu, lens, tables, slots = args
    cos, sin = (t.to(DEVICE) for t in _rope_tables(lens.cpu() - 1, head_dim, interleaved, torch.float32))
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, 0.3, None, None, None, k_scale, v_scale, cos, sin,
                                                 interleaved)
    got = mod.decode_attention(q, k_cache, v_cache, lens, tables, 0.3, num_splits=extra.get("num_splits"),
                               k_scale=k_scale, v_scale=v_scale, k=k, v=v, slot_mapping=slots,
                               rope=mod.rope_rows(q, cos, sin, interleaved))
    for cache, ref_cache in ((k_cache, ref_args[3]), (v_cache, ref_args[4])):
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("seqs", [DECODE, [(0, 9), (16, 1), (3, 20)]])
def test_op_with_rope_matches_reference(seqs, per_head):
    """cached_attention_triton with rope_cos / rope_sin on a decode-only step (the decode kernel rotates) and on a
    mixed step (rope_pair first), against the reference op; cos / sin given per head (as a dense [1, H, T, d]) are
    rotated beforehand on a decode step too."""
    args, _ = packed_case(seqs, n_heads=2, n_kv=2, head_dim=32, seed=len(seqs))
    args = tuple(a.to(DEVICE) for a in args)
    cu, lens = args[5].cpu(), args[6].cpu()
    positions = torch.cat([torch.arange(int(lens[b]) - int(cu[b + 1] - cu[b]), int(lens[b])) for b in range(len(seqs))])
    cos, sin = (t.to(DEVICE) for t in _rope_tables(positions, 32, False, torch.float32))
    if per_head:
        cos, sin = (torch.cat([t, t * 0.5], dim=1) for t in (cos, sin))
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, 0.2, rope_cos=cos, rope_sin=sin)
    got = torch.ops.autodeploy.cached_attention_triton(*args, 0.2, rope_cos=cos, rope_sin=sin)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(args[3], ref_args[3], atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("batch,ctx,fp8", [(1, 256, False), (64, 300, False), (3, 100, True)])
def test_decode_rope_gpu_8b_shape(batch, ctx, fp8, interleaved):
    """bf16 at the 8B shape (products rounded to bf16): the decode kernel rotating q and k itself writes the
    cache bytes of the eager rotation (the reference op: HF's numbers) followed by it, and the same outputs. (The
    rope kernel itself is off by an ulp in places on the GPU: the compiler fuses its bf16 product and sum.)"""
    from autodeploy.kernels import triton_decode_attention as mod
    from autodeploy.kernels.rope import rope_pair

    ctxs = [ctx - 37 * b % 90 for b in range(batch)]
    args = _fused_case(ctxs, 32, 8, 128, 32, batch, torch.bfloat16, fp8, 1.0, 1.0, "cuda")
    q, k, v, k_cache, v_cache, cu, lens, tables, slots = args
    cos, sin = (t.cuda() for t in _rope_tables(lens.cpu() - 1, 128, interleaved, torch.bfloat16))
    ref_caches = (k_cache.clone(), v_cache.clone())
    q_rot, k_rot = rope_pair(q, k, cos, sin, interleaved)
    want = mod.decode_attention(q_rot, *ref_caches, lens, tables, 0.088, k=k_rot, v=v, slot_mapping=slots)
    got = mod.decode_attention(q, k_cache, v_cache, lens, tables, 0.088, k=k, v=v, slot_mapping=slots,
                               rope=mod.rope_rows(q, cos, sin, interleaved))
    for cache, ref_cache in zip((k_cache, v_cache), ref_caches):
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
