"""Hybrid models through the paged/state runtime: per-sequence conv / SSM / delta-rule states in
state slots give the same tokens and log-probabilities as HF eager, batched == one by one, through
chunked prefill and preemption with recompute. LFM2 (short convs) and Falcon-Mamba (Mamba-1, no
attention layer at all: blocks only name state slots) run by default; Qwen3-Next (gated delta rule),
Bamba, Nemotron-H, Falcon-H1 (Mamba-2) and Jamba (Mamba-1 + attention) are `slow`."""

import tempfile
from pathlib import Path

import pytest
import torch

from autodeploy.llm import LLM
from autodeploy.model_zoo_ci.runner import build_checkpoint
from autodeploy.model_zoo_ci.zoo import load_zoo, select
from autodeploy.optimizer import optimize_model
from autodeploy.runtime.sampling_params import SamplingParams

PROMPTS = [[17, 301, 42, 7, 250, 99, 5, 128], [3, 9], [400, 12, 77, 31, 260, 8, 150, 44, 45, 46, 90, 13, 1, 511],
           [222], [60, 61, 62, 63, 64, 65]]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)


HYBRIDS = [pytest.param(name, marks=[] if name in ("lfm2", "falcon-mamba") else [pytest.mark.slow])
           for name in ("lfm2", "falcon-mamba", "qwen3-next", "bamba", "nemotron-h", "falcon-h1", "jamba")]


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request):
    entry = select(load_zoo(), only=[request.param])[0]
    with tempfile.TemporaryDirectory() as folder:
        hf = build_checkpoint(entry, Path(folder))

        def build(*overrides):
            return optimize_model(folder, recipe=str(entry.recipe), progress=False,
                                  overrides=["model.device=cpu", "model.dtype=float32", *overrides])

        yield hf, build(), build("transforms.insert_kv_cache.num_blocks=3", "transforms.insert_kv_cache.block_size=8")


def hf_reference(hf, prompt):
    """HF eager greedy tokens (full recompute) and the log-probability of each."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(PARAMS.max_tokens):
            logp = hf(torch.tensor([ids]), use_cache=False).logits[0, -1].log_softmax(-1)
            token = int(logp.argmax())
            tokens.append(token), logprobs.append(float(logp[token]))
            ids.append(token)
    return tokens, logprobs


def check(outs, hf):
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = hf_reference(hf, prompt)
        assert out.token_ids == tokens
        got = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
        assert got == pytest.approx(logprobs, abs=1e-4)


def test_batched_and_one_by_one_match_hf(hybrid):
    hf, model, _ = hybrid
    llm = LLM.from_optimized(model, max_num_tokens=16)  # the longest prompt prefills in two chunks
    assert llm.engine.prefix_cache is None  # on by default, kept off where first blocks are state slots
    check(llm.generate(PROMPTS, PARAMS), hf)
    check([llm.generate([p], PARAMS)[0] for p in PROMPTS], hf)
    check([llm.generate([p], PARAMS)[0] for p in PROMPTS], hf)  # the same prompts again: nothing reused


def test_preemption_recomputes_the_state(hybrid):
    hf, _, tiny = hybrid
    llm = LLM.from_optimized(tiny, max_batch_size=3, max_num_tokens=16)
    outs = llm.generate(PROMPTS, PARAMS)
    assert llm.engine.num_preemptions > 0
    check(outs, hf)
