"""OpenAI's response pieces built from RequestOutputs: finish reasons, usage and logprobs."""

from __future__ import annotations

from ..runtime.outputs import RequestOutput


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's finish reasons: ours are stop | length | abort | error (errors are answered before)."""
    return None if not out.finished else ("length" if out.finish_reason == "length" else "stop")


def usage(prompt_tokens: int, outs: list[RequestOutput]) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens the prefix cache supplied (summed over the request's
    sequences, at most prompt_tokens)."""
    completion = sum(len(o.token_ids) for o in outs)
    cached = min(prompt_tokens, sum(o.num_cached_tokens for o in outs))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(decode, token_ids: list[int], entries: list[dict[int, float]], k: int,
                        text_offset: int = 0) -> dict:
    """The completions endpoint's logprobs object for `token_ids` (OpenAI's legacy layout)."""
    tokens = [decode(t) for t in token_ids]
    offsets, at = [], text_offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(token_ids, entries)],
            "top_logprobs": [{decode(i): v for i, v in _top(e, k)} for e in entries], "text_offset": offsets}


def chat_logprobs(decode, token_ids: list[int], entries: list[dict[int, float]], k: int) -> dict:
    """The chat endpoint's logprobs object: one item per token with its top-k alternatives."""
    def item(token_id: int, value: float) -> dict:
        text = decode(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**item(t, e[t]), "top_logprobs": [item(i, v) for i, v in _top(e, k)]}
                        for t, e in zip(token_ids, entries)]}


def cumulative_logprob(out: RequestOutput) -> float:
    """The sum of the chosen tokens' log-probabilities (best_of ranks choices by it)."""
    return sum(e[t] for t, e in zip(out.token_ids, out.logprobs or []))
