"""Fill-in-the-middle for the `suffix` of /v1/completions.

A model trained for it knows three special tokens and writes the middle of a prefix-suffix-middle
prompt: <prefix token> prompt <suffix token> suffix <middle token>. A tokenizer without such tokens
belongs to a model that cannot honour a suffix, so the server refuses one (never ignores it).
"""

from __future__ import annotations

FIM_SPELLINGS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder, Granite code, ...
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
)


def fim_tokens(tokenizer) -> tuple[str, str, str] | None:
    """The tokenizer's (prefix, suffix, middle) special tokens, or None when it has none."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    return next((spelling for spelling in FIM_SPELLINGS if all(t in vocab for t in spelling)), None)


def fim_prompt(tokens: tuple[str, str, str], prompt: str, suffix: str) -> str:
    """The prefix-suffix-middle prompt whose continuation is the text between `prompt` and `suffix`."""
    prefix_token, suffix_token, middle_token = tokens
    return f"{prefix_token}{prompt}{suffix_token}{suffix}{middle_token}"
