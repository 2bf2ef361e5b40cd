"""Prefix caching and decode-aware chunking without a model: block references, hashing, eviction,
and what the scheduler computes."""

import argparse

import pytest

from autodeploy.runtime.block_manager import BlockManager
from autodeploy.runtime.prefix_cache import PrefixCache, chain_hash
from autodeploy.runtime.sampling_params import SamplingParams
from autodeploy.runtime.scheduler import Scheduler
from autodeploy.runtime.sequence import PENDING, Sequence

from runtime_helpers import run_step


def seq(i: int, tokens: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(f"r{i}", None, list(tokens), SamplingParams(max_tokens=max_tokens), arrival=i)


def assert_all_released(bm: BlockManager) -> None:
    assert bm.num_free == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def test_hash_chain_depends_on_tokens_parent_and_salt():
    a = chain_hash(b"root", [1, 2, 3, 4])
    assert a == chain_hash(b"root", [1, 2, 3, 4])
    assert len({a, chain_hash(b"root", [1, 2, 3, 5]), chain_hash(b"other", [1, 2, 3, 4]),
                chain_hash(a, [1, 2, 3, 4])}) == 4
    bm = BlockManager(4, 4)
    s1, s2 = seq(0, range(9)), seq(1, range(9))
    h1, h2 = PrefixCache(bm, "torch.float32")._hashes(s1), PrefixCache(bm, "torch.float8_e4m3fn")._hashes(s2)
    assert len(h1) == 2 and h1[0] != h2[0]  # another cache dtype: other content, other hashes


def test_pending_token_is_not_hashed_until_known():
    cache = PrefixCache(BlockManager(4, 4))
    s = seq(0, [1, 2, 3])
    s.output_ids.append(PENDING)
    assert cache._hashes(s) == []  # the block's 4th token is still on the device
    s.output_ids[-1] = 9
    assert cache._hashes(s) == [chain_hash(cache._root, [1, 2, 3, 9])]


def test_free_keeps_cached_blocks_and_evicts_them_last_and_least_recently_used():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = [], []
    assert bm.grow(a, 4) and bm.grow(b, 4)
    bm.register(a, [b"a0", b"a1"])
    bm.free(a)
    bm.free(b)  # plain blocks: given out before the cached ones
    assert bm.num_free == 4 and bm.num_cached == 2
    c = []
    assert bm.grow(c, 4) and bm.num_cached == 2 and bm.lookup([b"a0", b"a1"]) != []
    assert bm.grow(c, 6) and bm.num_cached == 1  # evicts a's tail block first, the prefix stays
    assert len(bm.lookup([b"a0", b"a1"])) == 1
    bm.free(c)
    assert_all_released(bm)


def test_shared_blocks_are_reference_counted_and_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = []
    assert bm.grow(a, 4)
    bm.register(a, [b"x0", b"x1"])
    hits = bm.lookup([b"x0", b"x1", b"x2"])
    assert hits == a
    b, c = [], []
    assert bm.allocate(b, hits, 5) and b[:2] == a and bm.ref_count(a[0]) == 2 and bm.num_free == 1
    assert not bm.allocate(c, hits, 9) and c == [] and bm.ref_count(a[0]) == 2  # 3 fresh needed, 1 free
    bm.free(a)
    assert bm.ref_count(b[0]) == 1 and bm.num_free == 1  # still held by b
    bm.free(b)
    assert bm.num_cached == 2 and bm.reset_prefix_cache() == 2 and bm.num_cached == 0
    assert_all_released(bm)


def test_duplicate_prefix_keeps_one_cached_copy():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = [], []
    assert bm.grow(a, 2) and bm.grow(b, 2)
    bm.register(a, [b"same"])
    bm.register(b, [b"same"])
    assert bm.num_cached == 1 and bm.lookup([b"same"]) == a
    bm.free(a), bm.free(b)
    assert_all_released(bm)


def test_admission_takes_the_longest_cached_prefix_but_computes_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=64, prefix_cache=PrefixCache(bm))
    first = seq(0, range(100, 112))  # 3 full blocks
    sched.add(first)
    run_step(sched)
    sched.finish(first)
    assert bm.num_cached == 3
    same, longer = seq(1, range(100, 112)), seq(2, list(range(100, 110)) + [1, 2, 3])
    sched.add(same), sched.add(longer)
    out = run_step(sched)
    # the same prompt reuses 2 blocks (its last token's block is recomputed); the other shares 2 blocks
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("r1", 4), ("r2", 5)]
    assert same.num_cached_tokens == 8 and longer.num_cached_tokens == 8
    assert same.block_ids[:2] == longer.block_ids[:2] and bm.ref_count(same.block_ids[0]) == 2
    assert sched.prefix_cache.stats.hit_tokens == 16 and sched.prefix_cache.stats.queried_tokens == 12 + 12 + 13
    sched.finish(same), sched.finish(longer)
    assert_all_released(bm)


def test_preempted_sequence_takes_its_own_blocks_back():
    bm = BlockManager(num_blocks=5, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=64, prefix_cache=PrefixCache(bm))
    old, new = seq(0, range(1, 8), max_tokens=20), seq(1, range(50, 58), max_tokens=20)
    sched.add(old), sched.add(new)
    run_step(sched)
    while not any(out.preempted for out in [run_step(sched)]):
        pass
    assert new.num_computed == 0 and new in sched.waiting
    sched.finish(old)
    to_compute = new.num_tokens - 8  # its two full prompt blocks were computed before the preemption
    out = run_step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("r1", to_compute)]
    assert new.num_cached_tokens == 0  # counted at its first admission only
    sched.finish(new)
    assert_all_released(bm)


@pytest.mark.parametrize("cap, chunks", [(0, [1, 20]), (6, [1, 5]), (1, [1, 1])])
def test_decode_aware_chunking_bounds_the_tokens_of_a_step_with_decodes(cap, chunks):
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=21, max_prefill_tokens_with_decodes=cap)
    decode, prompt = seq(0, [1, 2]), seq(1, range(60))
    sched.add(decode)
    run_step(sched)  # decode alone: its prompt
    sched.add(prompt)
    out = run_step(sched)
    assert [c.num_tokens for c in out.chunks] == chunks
    sched.finish(decode)
    out = run_step(sched)  # no decode left: the whole budget goes to the prompt
    assert [c.num_tokens for c in out.chunks] == [21]


def test_cli_commands_take_no_enable_prefix_caching():
    from autodeploy.bench.suite import BenchConfig, _prefix_caching_modes
    from autodeploy.bench.workload import latency, shared_prefix
    from autodeploy.cli_bench import register as register_bench
    from autodeploy.cli_generate import register
    from autodeploy.cli_serve import register as register_serve

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register(sub), register_bench(sub), register_serve(sub)
    for command in (["generate", "--prompt", "x"], ["chat"], ["serve"], ["bench"]):
        assert parser.parse_args(command).enable_prefix_caching is None  # the recipe decides
        assert parser.parse_args(command + ["--no-enable-prefix-caching"]).enable_prefix_caching is False
    shared, plain = [shared_prefix(2, 8, 4, 1)], [latency(1, 4, 1)]
    assert _prefix_caching_modes(BenchConfig(None, shared), default=True) == [True, False]
    assert _prefix_caching_modes(BenchConfig(None, plain), default=False) == [False]
    assert _prefix_caching_modes(BenchConfig(None, shared, prefix_caching="off"), default=True) == [False]
