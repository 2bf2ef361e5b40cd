"""Block manager, scheduler, sampler, detokenizer and stop rules, without a model."""

import pytest
import torch

from autodeploy.runtime.block_manager import BlockManager
from autodeploy.runtime.sampler import Sampler, filter_logits
from autodeploy.runtime.sampling_params import SamplingParams
from autodeploy.runtime.scheduler import Scheduler
from autodeploy.runtime.sequence import Sequence, Status
from autodeploy.runtime.stopping import find_stop_string, held_back, is_stop_token

from runtime_helpers import run_step


# --- block manager ------------------------------------------------------------------------------
def test_block_manager_grow_is_all_or_nothing_and_free_returns_blocks():
    bm = BlockManager(num_blocks=4, block_size=16)
    a, b = [], []
    assert bm.grow(a, 17) and len(a) == 2 and bm.num_free == 2
    assert bm.grow(a, 32) and len(a) == 2  # still fits in two blocks
    assert not bm.grow(b, 48) and b == [] and bm.num_free == 2  # 3 needed, 2 free: nothing taken
    assert bm.grow(b, 20) and bm.num_free == 0
    assert set(a).isdisjoint(b)
    bm.free(a)
    assert a == [] and bm.num_free == 2
    assert bm.blocks_for(0) == 0 and bm.blocks_for(1) == 1 and bm.blocks_for(33) == 3


# --- scheduler ----------------------------------------------------------------------------------
def seq(i: int, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(f"r{i}", None, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), arrival=i)


def test_token_budget_chunks_long_prompts_and_keeps_decodes_first():
    sched = Scheduler(BlockManager(64, 4), max_batch_size=8, max_num_tokens=10)
    a, b = seq(0, 3), seq(1, 25)
    sched.add(a), sched.add(b)
    out = run_step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("r0", 3), ("r1", 7)]
    assert a.output_ids == [7] and b.output_ids == []  # b's chunk does not reach its end: no token
    out = run_step(sched)  # a decodes (1), b continues its prompt with the rest of the budget
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("r0", 1), ("r1", 9)]
    out = run_step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("r0", 1), ("r1", 9)]
    assert b.num_computed == 25 and b.output_ids == [7]
    assert sum(c.num_tokens for c in out.chunks) <= 10


def test_max_batch_size_limits_running_sequences():
    sched = Scheduler(BlockManager(64, 4), max_batch_size=2, max_num_tokens=100)
    seqs = [seq(i, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    sched.finish(seqs[0])
    out = run_step(sched)
    assert {c.seq.request_id for c in out.chunks} == {"r1", "r2"}


def test_preempts_newest_and_recomputes():
    # 4 blocks of 4 tokens; three 4-token prompts fill 3 blocks; their decodes need 3 more.
    sched = Scheduler(BlockManager(4, 4), max_batch_size=8, max_num_tokens=100)
    seqs = [seq(i, 4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    assert all(s.status is Status.RUNNING for s in seqs)
    out = run_step(sched)  # r0 takes the last block, r1 needs one: the newest (r2) is preempted
    assert out.preempted == [seqs[2]]
    assert [c.seq.request_id for c in out.chunks] == ["r0", "r1"]
    assert seqs[2].status is Status.WAITING and seqs[2].num_computed == 0 and seqs[2].block_ids == []
    assert seqs[2].output_ids == [7]  # generated tokens are kept and will be recomputed
    sched.finish(seqs[0])
    out = run_step(sched)
    r2 = [c for c in out.chunks if c.seq is seqs[2]]
    assert r2 and r2[0].num_tokens == 5  # prompt + its output token, recomputed in one chunk


def test_sequence_preempts_itself_when_it_is_the_newest():
    sched = Scheduler(BlockManager(2, 4), max_batch_size=8, max_num_tokens=100)
    a, b = seq(0, 4), seq(1, 4)
    sched.add(a), sched.add(b)
    run_step(sched)
    out = run_step(sched)  # a needs a block: b (newest) goes; then b is not scheduled
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert list(sched.waiting) == [b]


def test_preempted_requests_keep_arrival_order_in_the_queue():
    sched = Scheduler(BlockManager(3, 4), max_batch_size=8, max_num_tokens=100)
    seqs = [seq(i, 4) for i in range(3)]
    late = seq(9, 2)
    for s in seqs:
        sched.add(s)
    run_step(sched)
    sched.add(late)
    out = run_step(sched)  # r0 needs a block: r2 goes; r1 needs one: nothing left but r1 itself
    assert out.preempted == [seqs[2], seqs[1]]
    assert list(sched.waiting) == [seqs[1], seqs[2], late]


# --- sampler ------------------------------------------------------------------------------------
def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    probs, index = filter_logits(logits, torch.ones(3), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 0.01]))
    assert index[0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(probs[0], torch.tensor([0.625, 0.375, 0, 0]))  # top-2
    torch.testing.assert_close(probs[1], torch.tensor([0.625, 0.375, 0, 0]))  # 0.5 < 0.7: two survive
    torch.testing.assert_close(probs[2], torch.tensor([1.0, 0, 0, 0]))  # the top token always survives


def test_sampler_greedy_seeded_and_reproducible():
    sampler = Sampler(seed=0)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)).expand(4, 50)
    greedy = SamplingParams(temperature=0)
    seeded = SamplingParams(temperature=1.0, seed=123)
    top1 = SamplingParams(temperature=0.7, top_k=1)

    def draw(params, n=20):
        gens = [sampler.generator_for(p, logits.device) for p in params]
        return [sampler.sample(logits, params, gens).tolist() for _ in range(n)]

    a = draw([greedy, seeded, top1, seeded])
    b = draw([seeded, greedy, seeded, top1])  # same seed, other batch neighbours and rows
    assert all(step[0] == logits[0].argmax().item() for step in a)
    assert all(step[2] == logits[0].argmax().item() for step in a)  # top_k=1 is greedy
    assert [step[1] for step in a] == [step[0] for step in b]  # reproducible wherever it sits
    assert len({step[1] for step in a}) > 1  # and actually random


def test_sampler_top_k_never_leaves_the_top_k():
    sampler = Sampler(seed=0)
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    allowed = set(logits[0].topk(5).indices.tolist())
    params = [SamplingParams(temperature=2.0, top_k=5)]
    assert {sampler.sample(logits, params, [None])[0].item() for _ in range(200)} <= allowed


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    assert SamplingParams(stop="x").stop == ["x"]


# --- stopping and detokenizer --------------------------------------------------------------------
def test_stop_strings():
    assert find_stop_string("hello world", 5, ["wor"], include=False) == 6
    assert find_stop_string("hello world", 5, ["wor"], include=True) == 9
    assert find_stop_string("hello wo", 2, ["lo w"], include=False) == 3  # across the new text's start
    assert find_stop_string("hello world", 1, ["hello"], include=False) is None  # matched before: not new
    assert held_back("abc\n\nUs", ["\n\nUser:"]) == 4
    assert held_back("abc", ["xyz"]) == 0


def test_stop_tokens():
    params = SamplingParams(stop_token_ids=[5])
    assert is_stop_token(params, 5, eos_ids={2}) and is_stop_token(params, 2, eos_ids={2})
    assert not is_stop_token(SamplingParams(ignore_eos=True), 2, eos_ids={2})


def test_incremental_detokenizer_matches_full_decode():
    from transformers import AutoTokenizer

    from autodeploy.default_model import ensure_default_model
    from autodeploy.runtime.detokenizer import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    prompt = tok("Say:")["input_ids"]
    output = tok(" naïve café – 日本語 🎉 done.\n  indented")["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in output]
    assert "".join(pieces) == tok.decode(output)
    assert "\ufffd" not in "".join(pieces)


# --- default token budget -----------------------------------------------------------------------
@pytest.mark.parametrize("device, memory_gib, export_max, want", [
    ("cpu", 0, 8192, 2048), ("cuda", 80, 8192, 8192), ("cuda", 141, 4096, 4096), ("cuda", 24, 8192, 2048),
    ("cpu", 0, 1024, 1024)])
def test_default_token_budget_follows_the_gpu_memory(monkeypatch, device, memory_gib, export_max, want):
    """8,192 tokens a step on GPUs of >= 70 GiB (vLLM's large-GPU server default), else 2,048; never
    past the graph's token dimension."""
    from types import SimpleNamespace

    from autodeploy.llm import default_max_num_tokens

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=memory_gib * 2**30))
    model = SimpleNamespace(device=torch.device(device),
                            recipe=SimpleNamespace(export=SimpleNamespace(max_seq_len=export_max)))
    assert default_max_num_tokens(model) == want
