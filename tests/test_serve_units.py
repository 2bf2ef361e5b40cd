"""The serving pieces that need no model: SamplingParams' checks, the LLM keyword map, tool-call
parsing and forcing, fill-in-the-middle prompts, and the ASGI gate (API key, body bound, request ids) in front of a toy app."""

import asyncio
import contextlib
import json
import math
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request

from autodeploy.llm_keywords import translate, valid_keywords
from autodeploy.runtime.sampling_params import SamplingParams
from autodeploy.serving.fim import FIM_SPELLINGS, fim_prompt, fim_tokens
from autodeploy.serving.gate import Gate
from autodeploy.serving.protocol import ApiError
from autodeploy.serving.streams import merged
from autodeploy.serving.tool_calls import forced_tool_choice, parse_tool_calls


@pytest.mark.parametrize("field, value, says", [
    ("temperature", math.nan, "finite"), ("temperature", math.inf, "finite"), ("temperature", -0.1, "temperature"),
    ("temperature", "0.5", "finite"), ("top_p", 0.0, "top_p"), ("top_p", math.nan, "finite"), ("top_p", 1.5, "top_p"),
    ("top_k", 10**20, "top_k"), ("top_k", -2, "top_k"), ("top_k", 2.0, "integer"), ("seed", 2**70, "seed"),
    ("seed", -1, "seed"), ("max_tokens", 0, "max_tokens"), ("max_tokens", 2**40, "max_tokens"),
    ("max_tokens", True, "integer"), ("logprobs", 21, "logprobs"), ("logprobs", -1, "logprobs"),
    ("stop", ["a"] * 17, "stop"), ("stop", [1], "stop"), ("stop_token_ids", [-1], "stop_token_ids"),
    ("stop_token_ids", "3", "stop_token_ids"), ("ignore_eos", "yes", "ignore_eos"),
])
def test_sampling_params_refuse_bad_values(field, value, says):
    with pytest.raises(ValueError, match=says):
        SamplingParams(**{field: value})


def test_sampling_params_accept_the_edges_and_tiny_temperatures_are_greedy():
    p = SamplingParams(max_tokens=2**31 - 1, temperature=1e-7, top_k=-1, top_p=1.0, seed=2**63 - 1, logprobs=20,
                       stop="x", stop_token_ids=[0])
    assert p.greedy and p.stop == ["x"] and not SamplingParams(temperature=0.5).greedy


def test_llm_keywords_map_onto_runtime_and_recipe():
    runtime, overrides = translate({"dtype": "torch.bfloat16", "max_model_len": 512, "max_num_seqs": 8,
                                    "max_num_batched_tokens": 256, "gpu_memory_utilization": 0.5,
                                    "enforce_eager": True, "seed": 3, "trust_remote_code": True,
                                    "tensor_parallel_size": 1, "transforms.match_rope.enabled": False})
    assert runtime == {"max_seq_len": 512, "max_batch_size": 8, "max_num_tokens": 256, "seed": 3,
                       "cuda_graph_batch_sizes": (), "cuda_graph_prefill_tokens": ()}
    assert overrides == ["model.dtype=bfloat16", "transforms.insert_kv_cache.free_memory_fraction=0.5",
                         "model.trust_remote_code=True", "parallel.tensor_parallel_size=1",
                         "transforms.match_rope.enabled=False"]
    with pytest.raises(TypeError, match=r"unknown LLM arguments \['max_modle_len'\].*max_model_len"):
        translate({"max_modle_len": 5})
    assert translate({"tensor_parallel_size": 2, "quantization": None})[1] == [
        "parallel.tensor_parallel_size=2", "quantization.algo=auto"]
    assert "gpu_memory_utilization" in valid_keywords() and "max_batch_size" in valid_keywords()


def test_hermes_tool_calls_with_prose():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


def test_llama3_json_tool_calls_and_plain_text():
    content, calls = parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert content is None and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    for text in ["Paris is the capital.", '{"not": "a call"}', "<tool_call>{broken</tool_call>", "{"]:
        assert parse_tool_calls(text) == (text, [])


_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
           {"type": "function", "function": {"name": "get_time"}}]


def test_forced_tool_choice_schemas_and_calls():
    assert forced_tool_choice(_TOOLS, "auto") is None and forced_tool_choice(None, None) is None
    named = forced_tool_choice(_TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.schema == _TOOLS[0]["function"]["parameters"]
    [call] = named.calls('{"city": "Paris"}')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert named.calls('{"city": "Pa') == []  # cut off by max_tokens: no call
    clock = forced_tool_choice(_TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert clock.schema["properties"] == {} and clock.calls("{}")[0]["function"]["arguments"] == "{}"
    required = forced_tool_choice(_TOOLS, "required")
    assert required.schema["minItems"] == 1 and [a["properties"]["name"] for a in required.schema["items"]["anyOf"]] \
        == [{"const": "get_weather"}, {"const": "get_time"}]
    calls = required.calls('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "x"}}]')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {}), ("get_weather", {"city": "x"})]
    assert required.calls("[]") == [] and required.calls('[{"name": "get_time"') == []


@pytest.mark.parametrize("tools, choice, says", [
    (None, "required", "no tools"), ([], {"type": "function", "function": {"name": "a"}}, "no tools"),
    (_TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among"), (_TOOLS, "always", "tool_choice must"),
    (_TOOLS, {"type": "function"}, "tool_choice must"), (_TOOLS, {"function": {"name": "get_time"}}, "tool_choice must"),
    ([{"type": "function", "function": {"name": ["x"]}}], "required", "needs a name"),
    ([{"type": "function", "function": {"name": "a", "parameters": 3}}], "required", "JSON Schema object"),
])
def test_forced_tool_choice_refusals(tools, choice, says):
    with pytest.raises(ApiError, match=says) as refused:
        forced_tool_choice(tools, choice)
    assert refused.value.status == 400 and "\n" not in refused.value.message


def test_fim_tokens_found_and_the_prompt_laid_out(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert fim_tokens(tokenizer) is None and fim_tokens(None) is None  # SmolLM2 has none: suffix is refused
    tokenizer.add_special_tokens({"additional_special_tokens": list(FIM_SPELLINGS[1])})
    spelling = fim_tokens(tokenizer)
    assert spelling == FIM_SPELLINGS[1]
    ids = tokenizer(fim_prompt(spelling, "def f(x):", "    return y"))["input_ids"]
    prefix, suffix, middle = tokenizer.convert_tokens_to_ids(list(spelling))
    assert ids[0] == prefix and ids[-1] == middle and ids.count(suffix) == 1
    assert tokenizer.decode(ids[1:ids.index(suffix)]) == "def f(x):"
    assert tokenizer.decode(ids[ids.index(suffix) + 1:-1]) == "    return y"


@pytest.fixture
def gated():
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body()), "id": request.state.request_id}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    counted = []
    wrapped = Gate(app, api_key="sesame", max_body_bytes=100, count=lambda e, s: counted.append((e, s)),
                   endpoints={"/v1/echo", "/health"})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://test"), counted



def test_gate_key_body_bound_and_request_id(gated):
    import asyncio

    client, counted = gated
    key = {"Authorization": "Bearer sesame"}

    async def chunks():
        yield b"x" * 60
        yield b"x" * 60

    async def go():
        return [await client.post("/v1/echo", content=b"x" * 10),
                await client.post("/v1/echo", content=b"x" * 10, headers={"Authorization": "Bearer wrong"}),
                await client.post("/v1/echo", content=b"x" * 100, headers={**key, "X-Request-Id": "abc-1"}),
                await client.post("/v1/echo", content=b"x" * 101, headers=key),
                await client.post("/v1/echo", content=chunks(), headers=key),  # chunked
                await client.get("/health"),
                await client.post("/v1/echo", content=b"", headers={**key, "X-Request-Id": "bad id\x7f"})]

    no_key, wrong, ok, big, chunked, health, odd_id = asyncio.run(go())
    assert no_key.status_code == wrong.status_code == 401 and no_key.json()["error"]["code"] == 401
    assert ok.json() == {"size": 100, "id": "abc-1"} and ok.headers["x-request-id"] == "abc-1"
    assert big.status_code == chunked.status_code == 413 and "100 bytes" in big.json()["error"]["message"]
    assert health.status_code == 200  # open without the key
    assert odd_id.json()["id"] != "bad id\x7f" and odd_id.headers["x-request-id"] == odd_id.json()["id"]
    assert ("/v1/echo", 401) in counted and ("/v1/echo", 413) in counted and ("/health", 200) in counted


@pytest.mark.parametrize("argv, says", [
    (["--port", "99999"], "--port 99999: must be in 1..65535"),
    (["--port", "0"], "--port 0"),
    (["--port", "abc"], "invalid int value"),
    (["--max-waiting", "-1"], "--max-waiting -1"),
    (["--drain-timeout", "-5"], "--drain-timeout"),
    (["--max-batch-size", "0"], "--max-batch-size 0"),
    (["--host", "no.such.host.invalid"], "--host no.such.host.invalid"),
])
def test_serve_flags_fail_in_one_line_before_the_model_loads(monkeypatch, capsys, argv, says):
    from autodeploy import cli, cli_generate

    monkeypatch.setattr(cli_generate, "_load", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) if "invalid int" in says else contextlib.nullcontext():
        assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_serve_finds_a_port_in_use_before_the_model_loads(monkeypatch, capsys):
    import socket

    from autodeploy import cli, cli_generate

    monkeypatch.setattr(cli_generate, "_load", lambda args: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err



@pytest.mark.parametrize("count", [1, 3])
def test_merged_tags_outputs_and_closing_it_closes_every_stream(count):
    """One stream is iterated in place, several through pumps: either way every output comes tagged with its
    stream's index, and leaving early closes the streams (the engine loop's `generate` aborts in its finally)."""
    closed = []

    async def stream(index, n):
        try:
            for i in range(n):
                yield SimpleNamespace(delta_token_ids=[i], finished=i == n - 1, index=index)
                await asyncio.sleep(0)
        finally:
            closed.append(index)

    metrics = SimpleNamespace(ttft=SimpleNamespace(observe=lambda s: None), itl=SimpleNamespace(observe=lambda s: None),
                              e2e=SimpleNamespace(observe=lambda s: None), tokens=SimpleNamespace(inc=lambda n: None))

    async def whole():
        return [(i, out.index) async for i, out in merged([stream(i, 4) for i in range(count)], metrics)]

    got = asyncio.run(whole())
    assert len(got) == 4 * count and all(i == index for i, index in got) and sorted(closed) == list(range(count))

    async def leave_early():
        async with contextlib.aclosing(merged([stream(i, 100) for i in range(count)], metrics)) as outs:
            async for _ in outs:
                break

    closed.clear()
    asyncio.run(leave_early())
    assert sorted(closed) == list(range(count))
