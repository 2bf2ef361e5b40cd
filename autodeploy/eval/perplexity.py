"""Perplexity of a text through an optimized model: the accuracy yardstick of quantization.

A quantized model is judged by how much worse it predicts a fixed text than the unquantized one
(issue 10's bars are relative rises of perplexity). The text is cut into windows of at most
`window` tokens that advance by about `stride` tokens (the sliding-window evaluation of HF's
perplexity guide): each window is one teacher-forced forward and scores only the tokens no earlier
window scored, so every token after the first is scored exactly once, with `window - stride` tokens
of earlier context at the window's start. stride == window is the cheapest (windows overlap by the
one token that predicts the next window's first); a smaller stride gives scored tokens more context. The log-softmax is taken in float32
whatever the model's dtype, so bf16 runs on the GPU compare with float32 runs on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from autodeploy.optimizer import OptimizedModel

class PerplexityInputError(ValueError):
    """Windows that cannot be run (bad window/stride, a window larger than the KV cache, too few tokens)."""


Logits = Callable[[torch.Tensor], torch.Tensor]  # input_ids [1, s] -> logits [1, s, vocab]


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float  # nats per scored token
    tokens: int  # tokens scored (all but the first)
    windows: int
    window: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; every position in 1..n-1 scored once.

    Each window after the first keeps `window - stride` tokens (at least one) of already scored
    context before the tokens it scores: a window's first token is never predicted inside it."""
    if window < 2 or not 1 <= stride <= window:
        raise PerplexityInputError(f"need window >= 2 and 1 <= stride <= window, got window {window}, stride {stride}")
    context = max(window - stride, 1)
    spans, scored_to = [], 1  # position 0 has no context: never scored
    while scored_to < num_tokens:
        begin = max(0, scored_to - context)
        end = min(begin + window, num_tokens)
        spans.append((begin, end, scored_to))
        scored_to = end
    return spans


@torch.inference_mode()
def perplexity(logits_fn: Logits, token_ids: list[int], window: int, stride: int | None = None,
               device: torch.device | str = "cpu") -> Perplexity:
    """Perplexity of `token_ids` under `logits_fn` (see the module docstring for the windows)."""
    stride = stride or window
    if len(token_ids) < 2:
        raise PerplexityInputError(f"a perplexity needs at least 2 tokens, got {len(token_ids)}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    spans = windows(len(token_ids), window, stride)
    nll, scored = 0.0, 0
    for begin, end, first in spans:
        logits = logits_fn(ids[None, begin:end].to(device))[0]
        # logits at position p predict token p + 1: score targets first..end-1 from positions first-1..end-2
        predicted = logits[first - 1 - begin:end - 1 - begin].float()
        targets = ids[first:end].to(predicted.device)
        nll += torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
        scored += end - first
    mean = nll / scored
    return Perplexity(perplexity=math.exp(mean), mean_nll=mean, tokens=scored, windows=len(spans),
                      window=window, stride=stride)


def text_token_ids(tokenizer, path: str | Path) -> list[int]:
    """The file's text as token ids, without special tokens (the text alone is scored)."""
    text = Path(path).read_text(encoding="utf-8")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def default_window(model: OptimizedModel) -> int:
    """The model's context, bounded by the exported graph's token dimension."""
    context = getattr(model.source.config.get_text_config(), "max_position_embeddings", None)
    return min(context or model.recipe.export.max_seq_len, model.recipe.export.max_seq_len)


def model_perplexity(model: OptimizedModel, token_ids: list[int], window: int | None = None,
                     stride: int | None = None) -> Perplexity:
    """Perplexity through the optimized graph (with a KV cache: each window one prefill through it)."""
    from autodeploy.runtime.kv_cache import kv_cache_of

    window = window or default_window(model)
    pool = kv_cache_of(model.gm)
    if pool is not None and window > pool.num_blocks * pool.block_size:
        raise PerplexityInputError(f"window {window} exceeds the KV cache ({pool.num_blocks} blocks of "
                                   f"{pool.block_size} tokens): lower --window or raise the cache size")
    return perplexity(model.logits, token_ids, window, stride or window, model.device)
