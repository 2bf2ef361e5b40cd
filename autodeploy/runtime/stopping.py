"""When a sequence is done, and where its text ends."""

from __future__ import annotations

from .sampling_params import SamplingParams


def is_stop_token(params: SamplingParams, token_id: int, eos_ids: set[int]) -> bool:
    """Whether `token_id` ends the sequence: a stop token id, or EOS unless ignored."""
    return token_id in params.stop_token_ids or (token_id in eos_ids and not params.ignore_eos)


def find_stop_string(text: str, new_len: int, stops: list[str], include: bool) -> int | None:
    """The length `text` is cut to if a stop string appears in, or across the start of, its last `new_len` chars."""
    cut = None
    for stop in stops:
        idx = text.find(stop, max(len(text) - new_len - len(stop) + 1, 0))
        if idx >= 0 and (cut is None or idx < cut[0]):
            cut = (idx, idx + len(stop) if include else idx)
    return None if cut is None else cut[1]


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters a stream must not show yet: they may begin a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold
