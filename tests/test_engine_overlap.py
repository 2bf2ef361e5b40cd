"""The overlapped engine (a step is launched before the previous step's tokens are read): what a
request sees must not depend on it. Tiny Llama on the CPU; the reference is each request alone."""

import pytest
import torch

from autodeploy.bench.tokenizer import synthetic_tokenizer
from autodeploy.optimizer import optimize_model
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.settings import EngineSettings
from autodeploy.runtime.sampling_params import SamplingParams
from autodeploy.runtime.sequence import PENDING

CACHE = ["model.device=cpu", "model.dtype=float32", "transforms.insert_kv_cache.num_blocks=64",
         "transforms.insert_kv_cache.block_size=4"]


@pytest.fixture(scope="module")
def opt(tiny_llama_dir):
    return optimize_model(tiny_llama_dir, overrides=CACHE, progress=False)


def engine(opt, eos: set[int] = frozenset(), **settings) -> Engine:
    return Engine(opt.gm, synthetic_tokenizer(256), set(eos), EngineSettings(max_num_tokens=64, **settings))


def drain(eng: Engine, abort: dict[str, int] | None = None) -> dict[str, list]:
    """Step until every request ended; `abort` = {request id: step at which to abort it}."""
    outs: dict[str, list] = {}
    step = 0
    while eng._requests or eng._in_flight is not None or eng._pending:
        for rid, at in (abort or {}).items():
            if at == step:
                eng.abort(rid)
        for out in eng.step():
            assert PENDING not in out.token_ids and PENDING not in out.delta_token_ids
            outs.setdefault(out.request_id, []).append(out)
        step += 1
    return outs


PROMPTS = [[5, 9, 13, 2, 7], [100, 3], list(range(40, 57))]


def alone(opt, prompt: list[int], params: SamplingParams) -> list[int]:
    eng = engine(opt)
    rid = eng.add_request(prompt, params)
    return drain(eng)[rid][-1].token_ids


def test_batched_requests_equal_each_alone_and_stream_every_token_once(opt):
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    eng = engine(opt)
    ids = [eng.add_request(p, params) for p in PROMPTS]
    outs = drain(eng)
    for rid, prompt in zip(ids, PROMPTS):
        final = outs[rid][-1]
        assert final.finished and final.finish_reason == "length"
        assert [t for o in outs[rid] for t in o.delta_token_ids] == final.token_ids  # each token exactly once
        assert final.token_ids == alone(opt, prompt, params)


def test_a_stop_token_seen_one_step_late_drops_the_extra_token(opt):
    """The request is already scheduled for one more step when its EOS arrives: that step's token
    must not appear, and its neighbours must not notice."""
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = alone(opt, PROMPTS[0], free)
    eos = want[3]
    first = want.index(eos)
    eng = engine(opt, eos={eos})
    stopped = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0))
    other = eng.add_request(PROMPTS[2], free)
    outs = drain(eng)
    assert outs[stopped][-1].finish_reason == "stop" and outs[stopped][-1].token_ids == want[:first + 1]
    assert outs[other][-1].token_ids == alone(opt, PROMPTS[2], free)
    assert eng.blocks.num_free == eng.blocks.num_blocks  # every block came back


def test_abort_while_a_step_is_in_flight(opt):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eng = engine(opt)
    victim, keeper = (eng.add_request(p, params) for p in PROMPTS[:2])
    outs = drain(eng, abort={victim: 4})
    final = outs[victim][-1]
    assert final.finish_reason == "abort" and 0 < len(final.token_ids) < 10
    assert final.token_ids == alone(opt, PROMPTS[0], params)[:len(final.token_ids)]
    assert outs[keeper][-1].token_ids == alone(opt, PROMPTS[1], params)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_logprobs_of_generated_tokens_match_the_full_forward(opt):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    eng = engine(opt)
    asked, plain = eng.add_request(PROMPTS[0], params), eng.add_request(PROMPTS[1], SamplingParams(max_tokens=2))
    outs = drain(eng)
    final = outs[asked][-1]
    assert outs[plain][-1].logprobs is None and len(final.logprobs) == len(final.token_ids) == 6
    ref = torch.log_softmax(opt.logits(torch.tensor([PROMPTS[0] + final.token_ids]))[0].float(), dim=-1)
    for i, (token, entry) in enumerate(zip(final.token_ids, final.logprobs)):
        row = ref[len(PROMPTS[0]) - 1 + i]
        assert len(entry) == 3 and max(entry, key=entry.get) == token  # greedy: the chosen one is the top 1
        for t, v in zip(*row.topk(3)[::-1]):
            assert entry[int(t)] == pytest.approx(float(v), abs=1e-4)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)
