"""Tool calls parsed back out of generated text, for the two formats chat templates teach models.

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call,
  possibly after some prose (which stays the message's content);
- Llama 3 JSON: the whole reply is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several calls separated by `;`.
Text that parses as neither is plain content: a model that chose not to call a tool.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _call(obj: Any) -> dict | None:
    """One OpenAI tool call from a parsed {"name", "arguments" | "parameters"} object, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, (dict, str)):
        return None
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
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
        calls = [_call(_parse_json(b)) for b in blocks]
        if all(calls):
            content = _HERMES.sub("", text).strip()
            return content or None, calls
        return text, []
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body.startswith("{"):
        calls = [_call(_parse_json(part)) for part in body.split(";")] if ";" in body else [_call(_parse_json(body))]
        if calls and all(calls):
            return None, calls
    return text, []
