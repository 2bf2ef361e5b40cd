"""`autodeploy serve`: an OpenAI-compatible HTTP server over one `LLM`.

Endpoints: POST /v1/completions and /v1/chat/completions (`"stream": true` as server-sent events
ending in `data: [DONE]`), GET /v1/models and /v1/models/{id}, POST /tokenize and /detokenize,
GET /health, /version and /metrics (Prometheus).

The engine runs on its own thread (serving/engine_loop.py); handlers validate, tokenize on a worker
thread, enqueue and await, so /health and the streams stay responsive at any load. Every error is
answered in OpenAI's shape ({"error": {"message", "type", "param", "code"}}): 400 for a bad value
(SamplingParams' checks, a prompt over max_seq_len, a field this server does not implement), 401
without the API key, 404, 405, 413 for a body over the limit, 503 past the bound on waiting
requests. A client that disconnects aborts its requests, streaming or not.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from . import __version__
from .llm import LLM, as_prompt_list, chat_prompt_ids
from .runtime.outputs import RequestOutput
from .runtime.sampling_params import SEED_MAX, SamplingParams
from .serving.engine_loop import ERROR_STATUS, EngineLoop
from .serving.fim import fim_prompt, fim_tokens
from .serving.gate import Gate
from .serving.metrics import ServerMetrics
from .serving.protocol import (ApiError, AsciiJSONResponse, ChatRequest, CompletionRequest, Message, ascii_json,
                               error_response, json_schema_of, message_dicts)
from .serving.responses import chat_logprobs, completion_logprobs, cumulative_logprob, finish_reason, usage
from .serving.streams import collect, merged
from .serving.tool_calls import forced_tool_choice, new_call_id, parse_tool_calls

log = logging.getLogger("autodeploy.serve")


@dataclass
class ServeOptions:
    """Bounds and access of one server (the CLI's flags)."""

    api_key: str | None = None
    max_body_bytes: int = 2 * 2**20
    max_prompt_chars: int = 0  # checked before tokenizing; 0 = 16 characters per token of max_seq_len
    max_waiting: int = 256  # requests queued beyond those running; past it: 503
    max_choices: int = 16  # n / best_of, and prompts x choices of one request


class TokenizeRequest(BaseModel):
    prompt: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(BaseModel):
    tokens: list[int]


def _sse(payload: dict | str) -> str:
    """One server-sent event (serialized directly: a Response object per token cost the event loop ~7 us)."""
    return f"data: {payload if isinstance(payload, str) else ascii_json(payload)}\n\n"


def create_app(llm: LLM, model_name: str, options: ServeOptions | None = None) -> FastAPI:
    """The server's app for `llm`, which answers to `model_name` (a request may also leave it out)."""
    options = options or ServeOptions()
    engine, tokenizer = llm.engine, llm.tokenizer
    vocab_size = engine.vocab_size
    max_prompt_chars = options.max_prompt_chars or 16 * engine.max_seq_len
    fim = fim_tokens(tokenizer)
    engine_loop = EngineLoop(engine)
    workers = ThreadPoolExecutor(1, thread_name_prefix="autodeploy-tokenize")  # one: tokenizers are not reentrant
    metrics = ServerMetrics(engine, lambda: len(engine.scheduler.waiting))
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # A full garbage collection walks every object alive, and a loaded model has many (544k for
        # SmolLM2): 1.4-1.7 s on a CPU, holding the interpreter, so /health and every stream stalled
        # that long whenever one ran. Frozen, they are skipped; collections see what serving allocates.
        gc.collect()
        gc.freeze()
        engine_loop.start()
        watch = asyncio.create_task(metrics.watch_event_loop())
        yield
        watch.cancel()
        engine_loop.stop()
        workers.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()

    app = FastAPI(title="autodeploy", description="OpenAI-compatible completions over an autodeploy LLM",
                  lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics

    # --- errors, all in OpenAI's shape ------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        log.info("request %s: %d %s", request.state.request_id, e.status, e.message)
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        return error_response(400, f"invalid request: {where}"[:2000])

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("request %s failed", getattr(request.state, "request_id", "?"))
        return error_response(500, f"internal error: {type(e).__name__}")

    # --- checks and preparation ---------------------------------------------------------------------
    async def off_loop(fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(workers, fn, *args)

    def check_common(req, choices: int) -> None:
        if req.model not in (None, model_name):
            raise ApiError(404, f"the model '{req.model}' does not exist (this server has '{model_name}')", "model")
        if not 1 <= req.n <= options.max_choices:
            raise ApiError(400, f"n must be in [1, {options.max_choices}], got {req.n}", "n")
        waiting = engine_loop.live + choices - engine.scheduler.max_batch_size
        if waiting > options.max_waiting:
            raise ApiError(503, f"the server is at capacity ({options.max_waiting} requests waiting); retry later")

    def check_ids(ids: list[int], what: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"{what} is empty", "prompt")
        if len(ids) > engine.max_seq_len:
            raise ApiError(400, f"{what} has {len(ids)} tokens, more than max_seq_len {engine.max_seq_len}", "prompt")
        if vocab_size is not None and not all(0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"{what} has token ids outside the vocabulary [0, {vocab_size})", "prompt")
        return ids

    def encode(text: str) -> list[int]:
        try:
            return list(tokenizer(text)["input_ids"])
        except Exception as e:  # e.g. a lone surrogate
            raise ApiError(400, f"cannot tokenize the prompt: {str(e)[:200]}", "prompt") from None

    async def prompt_ids(prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return check_ids(list(prompt), "the prompt")
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(prompt) > max_prompt_chars:
            raise ApiError(400, f"the prompt has {len(prompt)} characters, more than {max_prompt_chars}", "prompt")
        if tokenizer is None:
            raise ApiError(400, f"{model_name} has no tokenizer: send prompts as token ids", "prompt")
        return check_ids(await off_loop(encode, prompt), "the prompt")

    def sampling(req, max_tokens: int | None, longest_prompt: int, logprobs: int | None,
                 json_schema: dict | bool | None = None) -> SamplingParams:
        room = engine.max_seq_len - longest_prompt
        if max_tokens is None:  # as OpenAI's chat: without a limit the reply may fill the rest of the context
            max_tokens = max(room, 1)
        elif isinstance(max_tokens, int) and max_tokens > room > 0:
            raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {longest_prompt} tokens exceed "
                                f"max_seq_len {engine.max_seq_len}", "max_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                stop=req.stop or [], stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                min_tokens=req.min_tokens or 0,
                logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
                json_schema=json_schema)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def launch(request: Request, ids: list[list[int]], params: SamplingParams, choices: int) -> list:
        """Engine requests for every prompt x choice (choice j of a seeded request gets seed + j)."""
        base = f"{request.state.request_id}-{uuid.uuid4().hex[:8]}"
        log.info("request %s: %d prompt(s) x %d choice(s), %s prompt tokens", request.state.request_id,
                 len(ids), choices, [len(p) for p in ids])
        return [engine_loop.generate(p, params if params.seed is None or j == 0
                                     else replace(params, seed=(params.seed + j) % SEED_MAX),
                                     request_id=f"{base}-{i}-{j}")
                for i, p in enumerate(ids) for j in range(choices)]

    def failed(out: RequestOutput) -> ApiError | None:
        if out.finish_reason != "error":
            return None
        return ApiError(ERROR_STATUS.get(out.error, 400), out.error or "the request failed")

    async def echo_of(prompt: str | list[int]) -> str:
        """The prompt as text, for `echo` (token ids decode; without a tokenizer there is no text)."""
        if isinstance(prompt, str) or tokenizer is None:
            return prompt if isinstance(prompt, str) else ""
        return await off_loop(tokenizer.decode, prompt)

    def decode_one(token_id: int) -> str:
        return tokenizer.decode([token_id]) if tokenizer is not None else ""

    def header(kind: str) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": model_name}

    async def event_stream(streams: list, chunk: Callable[[int, RequestOutput], list[dict]],
                           head: dict, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        """SSE of merged engine requests; an error ends the stream in-band. Closing it aborts them."""
        finals: list[RequestOutput] = []
        async with aclosing(merged(streams, metrics)) as outs:
            async for index, out in outs:
                error = failed(out)
                if error is not None:
                    yield _sse({"error": {"message": error.message, "type": "invalid_request_error",
                                          "param": None, "code": error.status}})
                    break
                for payload in chunk(index, out):
                    yield _sse({**head, "choices": [payload], **({"usage": None} if include_usage else {})})
                if out.finished:
                    finals.append(out)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage(prompt_tokens, finals)})
        yield _sse("[DONE]")

    def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- endpoints ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    def card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "autodeploy",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist (this server has '{model_name}')", "model")
        return card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give either prompt or messages")
        if tokenizer is None:
            raise ApiError(400, f"{model_name} has no tokenizer")
        ids = (await off_loop(encode, req.prompt) if req.prompt is not None
               else await off_loop(template, message_dicts(req.messages), None))
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        if tokenizer is None:
            raise ApiError(400, f"{model_name} has no tokenizer")
        if vocab_size is not None and not all(0 <= t < vocab_size for t in req.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab_size})", "tokens")
        return {"prompt": await off_loop(tokenizer.decode, req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        best_of = req.best_of if req.best_of is not None else req.n
        prompts = as_prompt_list(req.prompt)
        if not prompts:
            raise ApiError(400, "the prompt is empty", "prompt")
        check_common(req, len(prompts) * best_of)
        if not req.n <= best_of <= options.max_choices or len(prompts) * best_of > options.max_choices:
            raise ApiError(400, f"need n <= best_of <= {options.max_choices} and prompts x best_of <= "
                                f"{options.max_choices} (n={req.n}, best_of={best_of}, {len(prompts)} prompts)",
                           "best_of")
        if req.stream and best_of > req.n:
            raise ApiError(400, "best_of > n cannot stream (the best choices are known only at the end)", "best_of")
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported (no prompt logprobs)", "echo")
        if req.suffix:
            if fim is None:
                raise ApiError(400, f"suffix needs a model trained for fill-in-the-middle; the tokenizer of "
                                    f"{model_name} has no such tokens", "suffix")
            if not all(isinstance(p, str) for p in prompts):
                raise ApiError(400, "suffix needs text prompts, not token ids", "suffix")
        ids = [await prompt_ids(fim_prompt(fim, p, req.suffix) if req.suffix else p) for p in prompts]
        params = sampling(req, req.max_tokens, max(map(len, ids)),
                          req.logprobs if req.logprobs is not None or best_of == req.n else 0)
        echoes = [await echo_of(p) for p in prompts] if req.echo else [""] * len(prompts)
        streams = launch(request, ids, params, best_of)
        prompt_tokens = sum(map(len, ids))

        def choice(index: int, out: RequestOutput, text: str, new_ids: list[int], offset: int) -> dict:
            lp = None
            if req.logprobs is not None:
                entries = out.logprobs[len(out.token_ids) - len(new_ids):] if out.logprobs else []
                lp = completion_logprobs(decode_one, new_ids, entries, req.logprobs, offset)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason(out)}

        if req.stream:
            shown: set[int] = set()

            def chunk(index: int, out: RequestOutput) -> list[dict]:
                if not (out.delta_text or out.finished or index not in shown):
                    return []
                echo = echoes[index // best_of] if index not in shown else ""
                shown.add(index)
                return [choice(index, out, echo + out.delta_text, out.delta_token_ids,
                               len(echoes[index // best_of]) + len(out.text) - len(out.delta_text))]

            include = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(event_stream(streams, chunk, header("text_completion"), prompt_tokens, include))
        outs = await collect(request, streams, metrics)
        for out in outs:
            if (error := failed(out)) is not None:
                raise error
        choices = []
        for i in range(len(prompts)):
            group = outs[i * best_of:(i + 1) * best_of]
            if best_of > req.n:
                group = sorted(group, key=cumulative_logprob, reverse=True)[:req.n]
            choices += [choice(len(choices), o, echoes[i] + o.text, o.token_ids, len(echoes[i])) for o in group]
        return {**header("text_completion"), "choices": choices, "usage": usage(prompt_tokens, outs)}

    def template(messages: list[dict], tools: list[dict] | None) -> list[int]:
        try:
            return chat_prompt_ids(tokenizer, messages, tools)
        except Exception as e:  # no chat template, or messages the template rejects
            raise ApiError(400, f"cannot apply the chat template: {str(e)[:300]}", "messages") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_common(req, req.n)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        tools = [t.model_dump() for t in req.tools] if req.tools and req.tool_choice != "none" else None
        forced = forced_tool_choice(tools, req.tool_choice)
        schema = json_schema_of(req.response_format)
        if forced is not None and schema is not None:
            raise ApiError(400, "response_format cannot be combined with a tool_choice that forces a call (both "
                                "constrain the reply)", "response_format")
        messages = message_dicts(req.messages)
        if sum(len(m["content"]) for m in messages) > max_prompt_chars:
            raise ApiError(400, f"the messages have more than {max_prompt_chars} characters", "messages")
        ids = check_ids(await off_loop(template, messages, tools), "the conversation")
        k = (req.top_logprobs or 0) if req.logprobs else None
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, limit, len(ids), k, forced.schema if forced is not None else schema)
        streams = launch(request, [ids], params, req.n)
        named = forced is not None and forced.name is not None  # its reply is the arguments: streamed as they come
        call_ids = [new_call_id() for _ in streams]  # a named call's id, sent before its arguments when streamed

        def reply(index: int, out: RequestOutput) -> tuple[dict, str | None]:
            if forced is not None:
                calls = forced.calls(out.text)
                content = None if calls else out.text
                if named:
                    calls = [{**c, "id": call_ids[index]} for c in calls]
            else:
                content, calls = parse_tool_calls(out.text) if tools else (out.text, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            # OpenAI's reasons: "tool_calls" when the model chose to call, "stop" when the call was forced by name
            called = calls and not named and out.finish_reason != "length"
            return message, ("tool_calls" if called else finish_reason(out))

        def logprobs_of(out: RequestOutput, new_ids: list[int]) -> dict | None:
            if k is None:
                return None
            return chat_logprobs(decode_one, new_ids, (out.logprobs or [])[len(out.token_ids) - len(new_ids):], k)

        if req.stream:
            started_choices: set[int] = set()

            def chunk(index: int, out: RequestOutput) -> list[dict]:
                payloads = []
                if index not in started_choices:
                    started_choices.add(index)
                    delta = {"role": "assistant", "content": None if named else ""}
                    if named:
                        delta["tool_calls"] = [{"index": 0, "id": call_ids[index], "type": "function",
                                                "function": {"name": forced.name, "arguments": ""}}]
                    payloads.append({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
                if tools and not named:  # calls are parsed from the whole reply: it comes in one piece at the end
                    if out.finished:
                        message, reason = reply(index, out)
                        delta = {"content": message["content"]}
                        if "tool_calls" in message:
                            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                        payloads.append({"index": index, "delta": delta, "logprobs": logprobs_of(out, out.token_ids),
                                         "finish_reason": reason})
                elif out.delta_text or out.finished:
                    delta = {}
                    if out.delta_text:
                        delta = ({"tool_calls": [{"index": 0, "function": {"arguments": out.delta_text}}]} if named
                                 else {"content": out.delta_text})
                    payloads.append({"index": index, "delta": delta,
                                     "logprobs": logprobs_of(out, out.delta_token_ids),
                                     "finish_reason": finish_reason(out)})
                return payloads

            include = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(event_stream(streams, chunk, header("chat.completion.chunk"), len(ids), include))
        outs = await collect(request, streams, metrics)
        for out in outs:
            if (error := failed(out)) is not None:
                raise error
        choices = []
        for i, out in enumerate(outs):
            message, reason = reply(i, out)
            choices.append({"index": i, "message": message, "logprobs": logprobs_of(out, out.token_ids),
                            "finish_reason": reason})
        return {**header("chat.completion"), "choices": choices, "usage": usage(len(ids), outs)}

    endpoints = {route.path for route in app.routes}
    app.add_middleware(Gate, api_key=options.api_key, max_body_bytes=options.max_body_bytes,
                       count=lambda endpoint, status: metrics.requests.labels(endpoint, str(status)).inc(),
                       endpoints=endpoints)
    return app
