"""The runtime end to end on the embedded SmolLM2-135M (float32, CPU) against HF eager generate."""

import asyncio

import pytest
import torch

from autodeploy import LLM, SamplingParams

from runtime_helpers import smollm2_cpu_base, with_cache

# Different lengths: single token, across the 16-token block boundary, several blocks.
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "1, 2, 3, 4,",
    "Once upon a time, in a land far away, there lived a",
    "Water boils at a temperature of one hundred degrees Celsius at sea level, but on a high mountain it boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and again "
    "because the dog never moves, and the fox, being a fox, likes to",
]
MAX_TOKENS = 16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: one thread is faster


@pytest.fixture(scope="module")
def base(default_model_dir):
    return smollm2_cpu_base(default_model_dir)


@pytest.fixture(scope="module")
def llm(base):
    # A small token budget so long prompts are chunked and mixed with other requests' decodes.
    return LLM.from_optimized(with_cache(base, num_blocks=128, block_size=16), max_batch_size=8, max_num_tokens=48)


@pytest.fixture(scope="module")
def batched(llm):
    return llm.generate(PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def hf_tokens(base, llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base.source.path, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = llm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def test_greedy_batch_matches_hf_eager(batched, hf_tokens):
    for prompt, ours, ref in zip(PROMPTS, batched, hf_tokens):
        assert ours.token_ids == ref, prompt
        assert ours.finished and ours.finish_reason in ("length", "stop")


def test_one_by_one_equals_batch(llm, batched):
    for prompt, together in zip(PROMPTS, batched):
        alone = llm.generate(prompt, GREEDY)[0]
        assert alone.token_ids == together.token_ids and alone.text == together.text, prompt


def test_runtime_settings_come_from_the_recipe_and_keywords_override_them(base):
    from dataclasses import replace

    cached = with_cache(base, num_blocks=16, block_size=16)
    runtime = replace(cached.recipe.runtime, max_batch_size=3, max_num_tokens=40)
    model = replace(cached, recipe=replace(cached.recipe, runtime=runtime))
    from_recipe = LLM.from_optimized(model).engine.scheduler
    assert (from_recipe.max_batch_size, from_recipe.max_num_tokens) == (3, 40)
    overridden = LLM.from_optimized(model, max_batch_size=5).engine.scheduler
    assert (overridden.max_batch_size, overridden.max_num_tokens) == (5, 40)
    assert model.recipe.runtime == runtime  # the recipe itself is left as it was


def test_tiny_pool_preempts_recomputes_and_rejects_overlong_prompt(base, batched):
    # 12 blocks of 16 tokens = 192 tokens for 8 requests that need ~330: preemption is unavoidable.
    tiny = LLM.from_optimized(with_cache(base, num_blocks=12, block_size=16), max_batch_size=8, max_num_tokens=64)
    too_long = " ".join(["word"] * 300)
    outs = tiny.generate(PROMPTS[:4] + [too_long] + PROMPTS[4:], GREEDY)
    rejected = outs.pop(4)
    assert rejected.finished and rejected.finish_reason == "error" and rejected.token_ids == []
    assert "max_seq_len 192" in rejected.error and "KV cache holds 192 tokens" in rejected.error
    assert tiny.engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in batched]
    assert tiny.engine.blocks.num_free == 12  # everything returned


def test_streaming_deltas_and_stop_string(llm, batched):
    full = batched[1].text  # " Paris. ..." for "The capital of France is"
    stop = full[len(full) // 2: len(full) // 2 + 4]
    outs = list(llm.stream(PROMPTS[1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[stop])))
    final = outs[-1]
    assert final.finish_reason == "stop" and final.text == full[: full.index(stop)]
    assert "".join(o.delta_text for o in outs) == final.text
    assert all(not o.finished for o in outs[:-1])


def test_abandoned_stream_aborts_and_frees_blocks(llm):
    stream = llm.stream(PROMPTS[7], GREEDY)
    first = next(stream)
    assert not first.finished
    stream.close()
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=1, temperature=0))  # steps the engine once more
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    alone = llm.generate(PROMPTS[2], params)[0]
    mixed = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[5]], [GREEDY, params, SamplingParams(max_tokens=4)])
    assert mixed[1].token_ids == alone.token_ids


def test_async_requests_batch_together(llm, batched):
    async def run(prompt):
        return [o async for o in llm.generate_async(prompt, GREEDY, streaming=False)]

    async def main():
        return await asyncio.gather(run(PROMPTS[0]), run(PROMPTS[3]))

    a, b = asyncio.run(main())
    assert len(a) == len(b) == 1
    assert a[0].token_ids == batched[0].token_ids and b[0].token_ids == batched[3].token_ids


def test_chat_template_and_stop_at_eos(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text


def test_cached_graph_still_gives_full_logits(base, llm):
    ids = llm.tokenizer(PROMPTS[6], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(llm.model.logits(ids), base.logits(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", [3.5, [1, [2]], [1, True], {"ids": [1]}])
def test_prompt_of_the_wrong_type_is_a_prompt_error(llm, prompt):
    from autodeploy.errors import PromptError

    with pytest.raises(PromptError, match="a prompt is a string or a list of token ids"):
        llm.generate([prompt], GREEDY)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].finish_reason == "length"  # still serves


@pytest.fixture
def cli(llm, monkeypatch):
    """The generate/chat subcommands on their own parser, over the module's already built LLM."""
    import argparse

    import autodeploy.llm
    from autodeploy.cli_generate import register

    seen = {}

    def fake_llm(model, recipe, overrides=(), **runtime):
        seen.update(model=model, overrides=overrides, runtime=runtime)
        return llm

    monkeypatch.setattr(autodeploy.llm, "LLM", fake_llm)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(argv)
        return args.func(args), seen

    return run


def test_cli_generate_streams_and_batches(cli, capsys, batched):
    code, seen = cli("generate", "transforms.insert_kv_cache.block_size=16", "--prompt", PROMPTS[1],
                     "--max-tokens", str(MAX_TOKENS), "--max-batch-size", "4")
    assert code == 0 and seen["model"] is None and seen["runtime"] == {"max_batch_size": 4}
    assert seen["overrides"] == ["transforms.insert_kv_cache.block_size=16"]
    assert capsys.readouterr().out == batched[1].text + "\n"
    code, _ = cli("generate", "--prompt", PROMPTS[0], "--prompt", PROMPTS[4], "--max-tokens", str(MAX_TOKENS))
    out = capsys.readouterr().out
    assert code == 0 and batched[0].text in out and batched[4].text in out


def test_cli_chat_reads_piped_stdin(cli, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/exit\nnever read\n"))
    code, _ = cli("chat", "--max-tokens", "24")
    assert code == 0 and "Paris" in capsys.readouterr().out
