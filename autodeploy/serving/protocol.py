"""The request bodies the server takes (OpenAI's names, and vLLM's extras), and OpenAI's error shape.

Pydantic checks types at the door (an unparsable value is a 400 naming the field); ranges and
finiteness are SamplingParams' job, so the Python API and the server refuse the same values.
A field this server cannot honour (a suffix for a model without fill-in-the-middle tokens) is refused
when set (400 naming it), never accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An error answer of the server, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def ascii_json(content: Any) -> str:
    """Compact JSON with everything past ASCII escaped: an echoed lone surrogate cannot fail the encoding."""
    return json.dumps(content, separators=(",", ":"))


class AsciiJSONResponse(JSONResponse):
    """A response whose body is `ascii_json`."""

    def render(self, content: Any) -> bytes:
        return ascii_json(content).encode("ascii")


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error")
    return AsciiJSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extras: top_k, seed, min_tokens, ignore_eos, stop_token_ids, ...
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    min_tokens: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, Any]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None


def json_schema_of(response_format: dict[str, Any] | None) -> dict | bool | None:
    """SamplingParams.json_schema for OpenAI's response_format (text, json_object or json_schema)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return True
    spec = response_format.get("json_schema")
    if kind == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict):
        return spec.get("schema") or True
    raise ApiError(400, "response_format must be {'type': 'text' | 'json_object'} or {'type': 'json_schema', "
                        "'json_schema': {'name': ..., 'schema': {...}}}", "response_format")


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: content parts joined into one string (text parts only)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            kinds = {p.type for p in content} - {"text"}
            if kinds:
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, got {sorted(kinds)}",
                               "messages")
            content = "".join(p.text or "" for p in content)
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            d["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                 "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out
