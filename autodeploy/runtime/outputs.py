"""What a request hands back, after every step while streaming and once when it is finished."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """The request's output so far. `delta_text`/`delta_token_ids` are what is new since the last
    output of the same request (for streaming). `error` says why a request ended with
    finish_reason 'error' (e.g. a prompt longer than max_seq_len) - it ends, it is not lost."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    # with SamplingParams(logprobs=k): one {token id: log-probability} per entry of token_ids
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)
