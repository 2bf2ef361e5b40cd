"""Tool calls: parsed back out of generated text (tool_choice "auto"), or forced (a named function or
"required") by constraining the output to JSON of the tools' argument schemas.

Parsed, for the two formats chat templates teach models:

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call,
  possibly after some prose (which stays the message's content);
- Llama 3 JSON: the whole reply is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several calls separated by `;`.
Text that parses as neither is plain content: a model that chose not to call a tool.

Forced, as vLLM does it: a named function constrains the reply (through the structured-output path,
llguidance) to its `parameters` schema, so the whole reply is the call's arguments; "required"
constrains it to a non-empty JSON array of {"name": one of the tools, "parameters": that tool's
schema}. Either way the reply is turned back into `tool_calls`, never shown as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .protocol import ApiError

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(obj: Any) -> dict | None:
    """One OpenAI tool call from a parsed {"name", "arguments" | "parameters"} object, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, (dict, str)):
        return None
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": arguments}}


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a reply; no calls found gives (text, [])."""
    blocks = _HERMES.findall(text)
    if blocks:
        calls = [tool_call(_parse_json(b)) for b in blocks]
        if all(calls):
            content = _HERMES.sub("", text).strip()
            return content or None, calls
        return text, []
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body.startswith("{"):
        calls = [tool_call(_parse_json(part)) for part in body.split(";")] if ";" in body else [tool_call(_parse_json(body))]
        if calls and all(calls):
            return None, calls
    return text, []


@dataclass
class ForcedToolChoice:
    """The JSON schema a forced tool_choice puts on the reply, and the function it names (None for
    "required": one or more calls of any of the tools)."""

    schema: dict
    name: str | None = None

    def calls(self, text: str) -> list[dict]:
        """The reply's tool calls; [] when it is not a complete call (cut off by max_tokens)."""
        if self.name is not None:
            return [tool_call({"name": self.name, "arguments": text})] if _parse_json(text) is not None else []
        items = _parse_json(text)
        calls = [tool_call(item) for item in items] if isinstance(items, list) else []
        return calls if calls and all(calls) else []


def _parameters(function: dict) -> dict:
    schema = function.get("parameters")
    if schema is None:  # OpenAI: no parameters means a function without arguments
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if not isinstance(schema, dict):
        raise ApiError(400, f"tools: the parameters of '{function.get('name')}' must be a JSON Schema object", "tools")
    return schema


def forced_tool_choice(tools: list[dict] | None, tool_choice: str | dict | None) -> ForcedToolChoice | None:
    """The constraint of a tool_choice that forces a call; None for "auto", "none" or no choice."""
    if tool_choice in (None, "auto", "none"):
        return None
    usage = "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if tool_choice != "required" and not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
                                          and isinstance(name, str)):
        raise ApiError(400, usage, "tool_choice")
    if not tools:
        raise ApiError(400, "tool_choice forces a tool call, but no tools are given", "tool_choice")
    names = [t["function"].get("name") for t in tools]
    if not all(isinstance(n, str) and n for n in names):
        raise ApiError(400, "tools: every function needs a name", "tools")
    functions = dict(zip(names, (t["function"] for t in tools)))
    if name is not None:
        if name not in functions:
            raise ApiError(400, f"tool_choice names '{name}', which is not among the tools", "tool_choice")
        return ForcedToolChoice(_parameters(functions[name]), name)
    one_call = [{"type": "object", "properties": {"name": {"const": n}, "parameters": _parameters(f)},
                 "required": ["name", "parameters"], "additionalProperties": False} for n, f in functions.items()]
    return ForcedToolChoice({"type": "array", "minItems": 1, "items": {"anyOf": one_call}})
