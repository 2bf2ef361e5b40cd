"""`autodeploy serve`: an OpenAI-compatible HTTP server over one `LLM`.

Endpoints: GET /health, GET /v1/models, POST /v1/completions and POST /v1/chat/completions, each with
`"stream": true` as server-sent events ending in `data: [DONE]`. Every request goes through the
LLM's async entry point on the server's event loop, so concurrent requests share engine steps (the
in-flight batch). Errors come back in OpenAI's shape ({"error": {"message", "type", "code"}}):
400 for a bad request (also a prompt the engine rejects, e.g. longer than max_seq_len), 404 for
another model's name. A client that disconnects mid-stream aborts its request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from .llm import LLM, as_prompt_list, chat_prompt_ids
from .runtime.outputs import RequestOutput
from .runtime.sampling_params import SamplingParams


class _Sampling(BaseModel):
    """The sampling fields both endpoints share (OpenAI's names; top_k, seed, ignore_eos as vLLM adds)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16


class ChatRequest(_Sampling):
    messages: list[dict[str, str]] = Field(min_length=1)
    max_completion_tokens: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's finish reasons: ours are stop | length | abort | error (errors are raised before)."""
    return None if not out.finished else ("length" if out.finish_reason == "length" else "stop")


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(llm: LLM, model_name: str) -> FastAPI:
    """The server's app for `llm`, which answers to `model_name` (any name is taken when absent)."""
    app = FastAPI(title="autodeploy", description="OpenAI-compatible completions over an autodeploy LLM")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return _error(400, f"invalid request: {where}", "invalid_request_error")

    def sampling(req: _Sampling, max_tokens: int | None) -> SamplingParams:
        if req.model not in (None, model_name):
            raise ApiError(404, f"the model '{req.model}' does not exist (this server has '{model_name}')",
                           "not_found_error")
        if req.n != 1:
            raise ApiError(400, f"n={req.n}: only n=1 is supported")
        try:
            return SamplingParams(max_tokens=max_tokens or 16, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=req.seed, stop=req.stop or [], ignore_eos=req.ignore_eos)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def final(prompt, params: SamplingParams) -> RequestOutput:
        async with aclosing(llm.generate_async(prompt, params, streaming=False)) as outs:
            async for out in outs:
                if out.finish_reason == "error":
                    raise ApiError(400, out.error or "the request failed")
                return out
        raise ApiError(500, "the request ended without output", "server_error")

    async def stream(prompt, params: SamplingParams, chunk) -> AsyncIterator[str]:
        """SSE events of one request, `chunk(out)` making each payload; errors end the stream in-band.
        Closing it (the client went away) closes the request's stream, which aborts the request."""
        async with aclosing(llm.generate_async(prompt, params)) as outs:
            async for out in outs:
                if out.finish_reason == "error":
                    yield _sse({"error": {"message": out.error, "type": "invalid_request_error", "code": 400}})
                    break
                if out.delta_text or out.finished:
                    yield _sse(chunk(out))
        yield _sse("[DONE]")

    def header(kind: str) -> dict:
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": model_name}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "autodeploy"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        params = sampling(req, req.max_tokens)
        prompts = as_prompt_list(req.prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ApiError(400, "prompt is empty")
        if llm.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise ApiError(400, f"{model_name} has no tokenizer: send prompts as token ids")
        if req.stream:
            if len(prompts) != 1:
                raise ApiError(400, "streaming takes one prompt")
            head = header("text_completion")
            return StreamingResponse(stream(prompts[0], params, lambda out: {**head, "choices": [
                {"index": 0, "text": out.delta_text, "finish_reason": _finish_reason(out)}]}),
                media_type="text/event-stream")
        outs = await asyncio.gather(*(final(p, params) for p in prompts))
        return {**header("text_completion"), "usage": _usage(outs), "choices": [
            {"index": i, "text": o.text, "finish_reason": _finish_reason(o), "logprobs": None}
            for i, o in enumerate(outs)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        try:
            prompt = chat_prompt_ids(llm.tokenizer, req.messages)
        except Exception as e:  # no tokenizer or chat template, or messages the template rejects
            raise ApiError(400, f"cannot apply the chat template: {e}") from None
        # as OpenAI's chat: without a limit the reply may fill the rest of the context
        params = sampling(req, req.max_completion_tokens or req.max_tokens
                          or max(1, llm.engine.max_seq_len - len(prompt)))
        if req.stream:
            head = header("chat.completion.chunk")

            def chunk(out: RequestOutput) -> dict:
                delta = {"role": "assistant", "content": out.delta_text} if out.delta_text else {}
                return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": _finish_reason(out)}]}

            return StreamingResponse(stream(prompt, params, chunk), media_type="text/event-stream")
        out = await final(prompt, params)
        return {**header("chat.completion"), "usage": _usage([out]), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": _finish_reason(out)}]}

    return app
