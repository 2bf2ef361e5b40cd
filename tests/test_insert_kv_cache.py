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
    assert names == ["input_ids", "position_ids", *METADATA_INPUTS, "k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1",
                     "logit_rows"]  # the last: gather_lm_head_rows
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_steps_padded_to_graph_buckets_keep_their_logits(base, backend):
    """A step laid out into a CUDA-graph bucket's static buffers (padding sequences in the scratch
    block, a placeholder token fed from the previous step's samples) gives the logits of the
    same step run unpadded. CPU buffers, no capture: this checks the padding, not the graph."""
    from autodeploy.runtime.batch import Chunk
    from autodeploy.runtime.cuda_graphs import Bucket, StepGraphs

    cached = with_cache(base, num_blocks=16, block_size=4, backend=backend)
    ex = ModelExecutor(cached.gm, max_batch_size=4)
    graphs = StepGraphs.__new__(StepGraphs)
    graphs.block_size, graphs.device, graphs.scratch_block, graphs.max_blocks_per_seq = 4, ex.device, 15, 8
    graphs._alloc_buffers(rows=32, seqs=16)
    rng = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, 256, (n,), generator=rng).tolist() for n in (9, 6))
    ex.forward(ex.pack([Chunk(a[:8], 0, [0, 1])]))  # a's prompt but its last token
    ex.remember(torch.tensor([7, a[8]]))  # a's last token arrives as row 1 of the "previous" samples
    step = [Chunk(b, 0, [2, 3]), Chunk([-1], 8, [0, 1, 4], feed_row=1)]
    want = ex._last_token_logits(ex.pack([Chunk(b, 0, [2, 3]), Chunk(a[8:], 8, [0, 1, 4])]))
    for bucket in (Bucket(7, 2), Bucket(16, 3), Bucket(16, 8), Bucket(9, 9)):
        if not bucket.holds(7, 2):
            assert bucket == Bucket(9, 9)  # a decode bucket takes only all-decode steps
            continue
        graphs._load(step, bucket)
        got = ex._last_token_logits(graphs._view(bucket))
        torch.testing.assert_close(got[:2], want, atol=1e-5, rtol=1e-5)
    decode = [Chunk([-1], 8, [0, 1, 4], feed_row=1)]
    graphs._load(decode, Bucket(4, 4))  # three one-token padding sequences
    torch.testing.assert_close(ex._last_token_logits(graphs._view(Bucket(4, 4)))[:1], want[1:],
                               atol=1e-5, rtol=1e-5)
