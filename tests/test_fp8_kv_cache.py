"""FP8 (e4m3) KV cache: the reference against attention over explicitly rounded keys/values, the Triton
paths (paged prefill, decode; interpreter on CPU) against the reference, the pool's capacity, and
insert_kv_cache `dtype: fp8` on a tiny Llama (scales from gm.meta, else 1.0)."""

import copy

import pytest
import torch
from torch.fx import GraphModule

import autodeploy.kernels  # noqa: F401
from autodeploy.errors import RecipeError, WeightLoadingError
from autodeploy.kernels.quant_format import FP8_DTYPE
from autodeploy.runtime.kv_cache import KV_SCALES_KEY, KVCachePool, LayerCacheShape, kv_cache_of
from autodeploy.transforms.insert_kv_cache import InsertKVCache, InsertKVCacheConfig

from runtime_helpers import with_cache
from test_cached_attention import MIXED, dense_attention, packed_case
from test_insert_kv_cache import base  # noqa: F401  (the module-scoped tiny Llama fixture)

ops = torch.ops.autodeploy
K_SCALE, V_SCALE = 0.02, 0.05


def e4m3(t: torch.Tensor, scale: float) -> torch.Tensor:
    """What an fp8 cache gives back for t: t / scale saturated, rounded to e4m3, times the scale."""
    return (t / scale).clamp(-448, 448).to(FP8_DTYPE).float() * scale


def fp8_case(seqs, n_heads, n_kv, head_dim, seed=0, k_scale=K_SCALE, v_scale=V_SCALE):
    """packed_case with fp8 caches (earlier steps' entries stored as an fp8 cache would hold them)."""
    args, full = packed_case(seqs, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, seed=seed)
    q, k, v, k_cache, v_cache, *meta = args
    k_cache = (k_cache / k_scale).clamp(-448, 448).to(FP8_DTYPE)
    v_cache = (v_cache / v_scale).clamp(-448, 448).to(FP8_DTYPE)
    return (q, k * 3, v, k_cache, v_cache, *meta), full  # k * 3: some keys saturate at 448 * k_scale


def test_reference_reads_and_writes_scaled_e4m3():
    seqs = [(5, 3), (0, 9), (20, 1)]
    (q, k, v, k_cache, v_cache, cu, lens, tables, slots), full = fp8_case(seqs, 4, 2, 16)
    scale = 16**-0.5
    out = ops.cached_attention(q, k, v, k_cache, v_cache, cu, lens, tables, slots, scale, None, None, None, K_SCALE, V_SCALE)
    assert k_cache.dtype == FP8_DTYPE
    # the new entries were written as e4m3(k / k_scale)
    flat_k = k_cache.view(-1, 2, 16)[slots].float().transpose(0, 1) * K_SCALE
    torch.testing.assert_close(flat_k, e4m3(k[0] * 1.0, K_SCALE), rtol=0, atol=0)
    assert flat_k.abs().max() == pytest.approx(448 * K_SCALE)  # saturated, not inf/nan
    for b, (q_b, k_all, v_all) in enumerate(full):
        cached = seqs[b][0]
        k_all, v_all = k_all.clone(), v_all.clone()
        k_all[:, cached:] *= 3  # the new keys as the case passed them
        want = dense_attention(q_b, e4m3(k_all, K_SCALE), e4m3(v_all, V_SCALE), scale)
        start, end = int(cu[b]), int(cu[b + 1])
        torch.testing.assert_close(out[0, :, start:end], want, rtol=1e-5, atol=1e-5)


def test_fp8_cache_close_to_float32_cache():
    """Within fp8 tolerance of the unquantized cache (scales that keep the values in range)."""
    args, _ = packed_case(MIXED, n_heads=4, n_kv=2, head_dim=32, seed=3)
    q, k, v, k_cache, v_cache, *meta = args
    want = ops.cached_attention(q, k, v, k_cache.clone(), v_cache.clone(), *meta, 32**-0.5)
    fp8 = (k_cache / 0.01).to(FP8_DTYPE), (v_cache / 0.01).to(FP8_DTYPE)
    got = ops.cached_attention(q, k, v, *fp8, *meta, 32**-0.5, None, None, None, 0.01, 0.01)
    # e4m3 keeps 3 mantissa bits: ~3.6 % rms rounding error per value, and about that in the output
    assert (got - want).abs().max() < 0.2 and (got - want).norm() / want.norm() < 0.06


@pytest.mark.parametrize("seqs", [MIXED, [(0, 1), (15, 1), (16, 1), (40, 1), (70, 1)]], ids=["mixed", "decode"])
@pytest.mark.parametrize("group,sliding_window,logit_cap", [(2, None, None), (4, 7, None), (1, None, 5.0)])
def test_triton_paths_match_reference(seqs, group, sliding_window, logit_cap):
    """Paged prefill kernel (mixed batch) and decode kernel (T == B) with fp8 caches: the same cache bytes
    and the same output as the reference."""
    args, _ = fp8_case(seqs, n_heads=2 * group, n_kv=2, head_dim=32, seed=group)
    ref_args = tuple(a.clone() for a in args)
    scale = 32**-0.5
    want = ops.cached_attention(*ref_args, scale, sliding_window, logit_cap, None, K_SCALE, V_SCALE)
    got = ops.cached_attention_triton(*args, scale, sliding_window, logit_cap, None, K_SCALE, V_SCALE)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for cache, ref_cache in ((args[3], ref_args[3]), (args[4], ref_args[4])):
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_splits_apply_v_scale_once(num_splits):
    from autodeploy.kernels.triton_decode_attention import decode_attention

    args, _ = fp8_case([(9, 1), (33, 1)], n_heads=4, n_kv=2, head_dim=16, seed=9)
    q, k, v, k_cache, v_cache, cu, lens, tables, slots = args
    want = ops.cached_attention(*(a.clone() for a in args), 0.25, None, None, None, K_SCALE, V_SCALE)
    ops.cached_attention(q, k, v, k_cache, v_cache, cu, lens, tables, slots, 0.25, None, None, None, K_SCALE, V_SCALE)
    got = decode_attention(q, k_cache, v_cache, lens, tables, 0.25, num_splits=num_splits,
                           k_scale=K_SCALE, v_scale=V_SCALE)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_fp8_pool_holds_twice_the_blocks_of_bf16():
    layers = [LayerCacheShape(8, 128, 128)] * 4
    bf16, fp8 = (KVCachePool.bytes_per_block(layers, 32, dt) for dt in (torch.bfloat16, FP8_DTYPE))
    assert bf16 == 2 * fp8
    pool = KVCachePool.allocate(layers, 32, (2**22) // fp8, FP8_DTYPE, torch.device("cpu"))
    assert pool.num_blocks == 2 * ((2**22) // bf16)
    assert sum(c.numel() * c.element_size() for c in pool.graph_inputs()) <= 2**22


def test_insert_kv_cache_fp8_capacity_and_logits(base, monkeypatch):  # noqa: F811
    import autodeploy.transforms.insert_kv_cache as module

    monkeypatch.setattr(module, "free_memory_bytes", lambda device: 2**20)
    sized = {name: kv_cache_of(with_cache(base, free_memory_fraction=0.5, block_size=4, dtype=name).gm)
             for name in ("bfloat16", "fp8")}
    assert sized["fp8"].k_caches[0].dtype == FP8_DTYPE
    assert sized["fp8"].num_blocks == 2 * sized["bfloat16"].num_blocks  # tokens measured: 2x
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    want = base.logits(ids)
    for backend in ("torch", "triton"):
        cached = with_cache(base, num_blocks=8, block_size=4, backend=backend, dtype="fp8")
        got = cached.logits(ids)
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert got.argmax(-1).eq(want.argmax(-1)).float().mean() > 0.9


def _insert_with_scales(base, scales, dtype="fp8"):  # noqa: F811  (base: the fixture value)
    """insert_kv_cache on a copy of base's graph whose meta carries the loader's KV scales."""
    gm = GraphModule(base.gm, copy.deepcopy(base.gm.graph))
    if scales is not None:
        gm.meta[KV_SCALES_KEY] = scales
    InsertKVCache(InsertKVCacheConfig(num_blocks=8, block_size=4, dtype=dtype)).apply(gm, base.ctx)
    return [n.args[-2:] for n in gm.graph.nodes if n.target == ops.cached_attention.default]


def test_insert_kv_cache_takes_scales_from_meta(base):  # noqa: F811
    assert _insert_with_scales(base, [(0.5, 0.25), (0.125, 2.0)]) == [(0.5, 0.25), (0.125, 2.0)]
    assert _insert_with_scales(base, None) == [(1.0, 1.0), (1.0, 1.0)]  # no checkpoint scales: 1.0
    with pytest.raises(WeightLoadingError, match="scales for 1 attention layers, the model has 2"):
        _insert_with_scales(base, [(1.0, 1.0)])
    with pytest.raises(RecipeError, match="unknown cache dtype 'int3'"):
        _insert_with_scales(base, None, dtype="int3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seqs", [MIXED, [(0, 1), (40, 1), (300, 1)]], ids=["mixed", "decode"])
def test_triton_fp8_cache_bf16_on_gpu(seqs):
    """The compiled paths: hardware e4m3 casts in the KV write, fp8 -> bf16 loads in both kernels."""
    args, _ = fp8_case(seqs, n_heads=8, n_kv=2, head_dim=128, seed=5)
    args = tuple((a.bfloat16() if a.dtype == torch.float32 else a).cuda() for a in args)
    ref_args = tuple(a.clone() for a in args)
    want = ops.cached_attention(*ref_args, 128**-0.5, None, None, None, K_SCALE, V_SCALE)
    got = ops.cached_attention_triton(*args, 128**-0.5, None, None, None, K_SCALE, V_SCALE)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for cache, ref_cache in ((args[3], ref_args[3]), (args[4], ref_args[4])):
        assert (cache.float() - ref_cache.float()).abs().max() <= 32  # at most one e4m3 step (Triton divides approximately)
