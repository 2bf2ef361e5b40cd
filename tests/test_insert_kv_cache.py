"""insert_kv_cache on a tiny Llama: the packed interface, cache sizing, and logits equal to the
uncached graph through both cached-attention backends."""

import pytest
import torch

from autodeploy.optimizer import optimize_model
from autodeploy.runtime.executor import ModelExecutor
from autodeploy.runtime.kv_cache import METADATA_INPUTS, kv_cache_of

from runtime_helpers import NO_CACHE, with_cache

CPU_F32 = ["model.device=cpu", "model.dtype=float32"]


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return optimize_model(tiny_llama_dir, overrides=CPU_F32 + [NO_CACHE], progress=False)


def test_interface_and_report(tiny_llama_dir):
    opt = optimize_model(tiny_llama_dir, overrides=CPU_F32 + ["transforms.insert_kv_cache.num_blocks=16",
                                                              "transforms.insert_kv_cache.block_size=8"],
                         progress=False)
    report = next(r for r in opt.reports if r.name == "insert_kv_cache")
    assert report.matched == {"cached_attention": 2, "cache_blocks": 16} and not report.warnings
    names = [n.name for n in opt.gm.graph.nodes if n.op == "placeholder"]
    assert names == ["input_ids", "position_ids", *METADATA_INPUTS, "k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    pool = kv_cache_of(opt.gm)
    assert pool.k_caches[0].shape == (16, 8, 2, 16) and pool.k_caches[0].dtype == torch.float32
    assert not any(n.target == torch.ops.autodeploy.attention.default for n in opt.gm.graph.nodes)
    opt.gm.graph.lint()


def test_pool_sized_from_free_memory(base, monkeypatch):
    import autodeploy.transforms.insert_kv_cache as module

    monkeypatch.setattr(module, "free_memory_bytes", lambda device: 2**20)
    pool = kv_cache_of(with_cache(base, free_memory_fraction=0.5, block_size=4).gm)
    per_block = 2 * 2 * 2 * 16 * 4 * 4  # layers * (k, v) * kv heads * head dim * block size * float32
    assert pool.num_blocks == 2**19 // per_block


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_equal_uncached_graph(base, backend):
    cached = with_cache(base, num_blocks=8, block_size=4, backend=backend)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cached.logits(ids), base.logits(ids), atol=1e-5, rtol=1e-5)


def test_packed_prefill_then_decodes_equal_full_logits(base):
    """Two sequences at different stages in one forward: a prompt chunk next to a decode."""
    from autodeploy.runtime.batch import Chunk

    cached = with_cache(base, num_blocks=8, block_size=4)
    ex = ModelExecutor(cached.gm)
    a = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    b = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    ex.forward(ex.pack([Chunk(a[:8], 0, [0, 1])]))  # a's prompt, all but one token
    logits = ex.forward(ex.pack([Chunk(b, 0, [2, 3]), Chunk(a[8:], 8, [0, 1, 4])]))
    full_a, full_b = base.logits(torch.tensor([a])), base.logits(torch.tensor([b]))
    torch.testing.assert_close(logits[:6], full_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[6], full_a[0, 8], atol=1e-5, rtol=1e-5)
