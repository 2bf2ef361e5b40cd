"""Prefix caching end to end on the embedded SmolLM2-135M (float32, CPU): greedy tokens with the
cache on equal those with it off, the prompt tokens the engine computes shrink to what is new, and
no step writes a block another request reads or reads a block nobody wrote (free blocks are
poisoned with NaN before every step)."""

import pytest

from autodeploy import LLM, SamplingParams
from autodeploy.llm import chat_prompt_ids

from runtime_helpers import smollm2_cpu_base, with_cache

BLOCK = 16
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
TEXT = ("The history of the city begins with a small fishing village on the river bank. Over the centuries "
        "merchants arrived, built warehouses and bridges, and the village grew into a trading town with a "
        "market square, a cathedral and a university. ")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: one thread is faster


@pytest.fixture(scope="module")
def base(default_model_dir):
    return smollm2_cpu_base(default_model_dir)


def poisoned(llm: LLM) -> LLM:
    """Before every step: check that no written block is shared or cached, and fill every free
    block that caches nothing with NaN (a read of one turns the logits to NaN)."""
    eng = llm.engine
    blocks, pool, run = eng.blocks, eng.executor.pool, eng.executor.last_token_logits
    poisoned_blocks: set[int] = set()  # still garbage since they were poisoned

    def checked(chunks):
        for c in chunks:
            for b in {c.block_ids[p // BLOCK] for p in range(c.start, c.start + len(c.token_ids))}:
                assert blocks.ref_count(b) == 1 and not blocks.is_cached(b), f"block {b} written while shared"
        garbage = {b for b in range(blocks.num_blocks) if blocks.ref_count(b) == 0 and not blocks.is_cached(b)}
        fresh = sorted(garbage - poisoned_blocks)
        poisoned_blocks.intersection_update(garbage)
        poisoned_blocks.update(fresh)
        if fresh:
            for cache in pool.graph_inputs():
                cache[fresh] = float("nan")
        return run(chunks)

    eng.executor.last_token_logits = checked
    return llm


def make_llm(base, caching: bool, num_blocks: int = 160, **settings) -> LLM:
    llm = LLM.from_optimized(with_cache(base, num_blocks=num_blocks, block_size=BLOCK), max_batch_size=8,
                             max_num_tokens=256, enable_prefix_caching=caching, **settings)
    return poisoned(llm) if caching else llm


@pytest.fixture(scope="module")
def on(base):
    return make_llm(base, True)


@pytest.fixture(scope="module")
def off(base):
    return make_llm(base, False)


@pytest.fixture(autouse=True)
def blocks_released(request):
    """After every test: each engine's blocks are free (cached ones unreferenced), nothing in flight."""
    yield
    for name in ("on", "off"):
        if name in request.fixturenames:
            blocks = request.getfixturevalue(name).engine.blocks
            assert blocks.num_free == blocks.num_blocks
            assert all(blocks.ref_count(b) == 0 for b in range(blocks.num_blocks))


@pytest.fixture(scope="module")
def text_ids(on):
    return on.tokenizer(TEXT * 12)["input_ids"]


def computed(llm: LLM, prompts, params=GREEDY):
    """Outputs and the prompt tokens the engine ran through the model for them."""
    before = llm.engine.num_prompt_tokens_computed
    outs = llm.generate(prompts, params)
    return outs, llm.engine.num_prompt_tokens_computed - before


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_second_of_two_identical_512_token_prompts_computes_at_most_one_block(on, off, text_ids):
    on.reset_prefix_cache()
    prompt = text_ids[:512]
    first, n_first = computed(on, [prompt])
    second, n_second = computed(on, [prompt])
    assert n_first == 512 and first[0].num_cached_tokens == 0
    assert 1 <= n_second <= BLOCK and second[0].num_cached_tokens == 512 - n_second
    assert tokens(first) == tokens(second) == tokens(off.generate([prompt], GREEDY))
    stats = on.engine.stats()
    assert stats["cached_blocks"] >= 32 and 0 < stats["prefix_cache_hit_rate"] < 1


def test_eight_prompts_sharing_a_200_token_prefix_together_and_one_after_another(on, off, text_ids):
    prefix = text_ids[:200]
    prompts = [prefix + on.tokenizer(f" Question {i}: who built bridge number {i * 7}?")["input_ids"] for i in range(8)]
    reference = tokens(off.generate(prompts, GREEDY))
    on.reset_prefix_cache()
    together, n_together = computed(on, prompts)
    assert tokens(together) == reference
    assert n_together < sum(map(len, prompts))  # chunked prefill: later prompts find the first one's blocks
    on.reset_prefix_cache()
    alone = [computed(on, [p]) for p in prompts]
    assert [o[0].token_ids for o, _ in alone] == reference
    assert all(o[0].num_cached_tokens == 192 and n == len(p) - 192 for (o, n), p in zip(alone[1:], prompts[1:]))


def test_five_turn_chat_computes_only_each_turns_new_tokens(on, off):
    on.reset_prefix_cache()
    history = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
    seen: list[int] = []  # the previous turn's prompt and the reply tokens whose K/V were computed
    params = SamplingParams(max_tokens=6, temperature=0)
    for turn, question in enumerate(["Hi!", "What is 2 + 2?", "And 3 + 3?", "Name a color.", "Thanks, bye."]):
        history.append({"role": "user", "content": question})
        prompt = chat_prompt_ids(on.tokenizer, history)
        (reply,), n = computed(on, [prompt], params)
        assert reply.token_ids == off.generate([prompt], params)[0].token_ids
        common = next((i for i, (a, b) in enumerate(zip(prompt, seen)) if a != b), min(len(prompt), len(seen)))
        if turn:
            assert common >= len(seen) - len(reply_ids)  # the new prompt extends the previous one
        assert n < len(prompt) - common + BLOCK, f"turn {turn}: {n} computed for {len(prompt) - common} new tokens"
        reply_ids = reply.token_ids
        seen = prompt + reply_ids[:-1]
        history.append({"role": "assistant", "content": reply.text})


@pytest.mark.parametrize("shared, cached", [(2 * BLOCK, 2 * BLOCK), (2 * BLOCK + 1, 2 * BLOCK), (2 * BLOCK - 1, BLOCK)])
def test_prefixes_ending_on_and_past_a_block_boundary(on, off, text_ids, shared, cached):
    on.reset_prefix_cache()
    first = text_ids[:shared] + [28, 29, 30]
    second = text_ids[:shared] + [31, 32]
    outs = [computed(on, [p])[0][0] for p in (first, second)]
    assert outs[1].num_cached_tokens == cached
    assert [o.token_ids for o in outs] == tokens(off.generate([first, second], GREEDY))


def test_a_prompt_cached_whole_still_computes_its_last_token(on, off, text_ids):
    on.reset_prefix_cache()
    prompt = text_ids[:2 * BLOCK]  # exactly two full blocks
    on.generate([prompt], GREEDY)
    (again,), n = computed(on, [prompt])
    assert n == BLOCK and again.num_cached_tokens == BLOCK  # the last block holds the last token: recomputed
    assert again.token_ids == off.generate([prompt], GREEDY)[0].token_ids


def test_tiny_pool_evicts_cached_blocks_and_preempts(base, off, text_ids):
    # 8 blocks (128 tokens) for 4 requests of 44 + 16 tokens sharing 32: preemption and eviction.
    tiny = make_llm(base, True, num_blocks=8)
    prompts = [text_ids[:32] + text_ids[100 + 13 * i:100 + 13 * i + 12] for i in range(4)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    reference = tokens(off.generate(prompts, params))
    assert tokens(tiny.generate(prompts, params)) == reference
    assert tokens(tiny.generate(prompts[::-1], params)) == reference[::-1]
    stats = tiny.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["evicted_blocks"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert tiny.engine.blocks.num_free == 8 and all(tiny.engine.blocks.ref_count(b) == 0 for b in range(8))


def test_poison_catches_a_read_of_a_block_with_the_wrong_content(on, off, text_ids):
    """The check above can fail: poisoning a cached block that a request then reuses changes its tokens."""
    on.reset_prefix_cache()
    prompt = text_ids[:3 * BLOCK + 5]
    on.generate([prompt], GREEDY)
    cached = [b for b in range(on.engine.blocks.num_blocks) if on.engine.blocks.is_cached(b)]
    assert len(cached) == 3
    for cache in on.engine.executor.pool.graph_inputs():
        cache[cached] = float("nan")
    (bad,) = on.generate([prompt], GREEDY)
    assert bad.num_cached_tokens == 3 * BLOCK
    assert bad.token_ids != off.generate([prompt], GREEDY)[0].token_ids
    assert on.reset_prefix_cache() == 3 and on.engine.blocks.num_cached == 0


def test_caching_off_computes_every_prompt_token(off, text_ids):
    prompt = text_ids[:40]
    for _ in range(2):
        (out,), n = computed(off, [prompt])
        assert n == 40 and out.num_cached_tokens == 0
    assert off.engine.stats()["cached_blocks"] == 0
