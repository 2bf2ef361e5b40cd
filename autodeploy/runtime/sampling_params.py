"""Per-request generation settings, validated up front so a bad request fails before it queues.

Every field is checked for type, finiteness and range here, because a value that slips through
(a NaN temperature, a top_k past int64, a seed past 2**64) fails only later, inside a batched step
that other requests share. What depends on the model (token ids within the vocabulary, max_tokens
within the context) is checked where the model is known: the engine's admission and the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import SamplingParamsError

INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
MAX_STOPS = 16
MAX_LOGIT_BIAS = 300  # as OpenAI's
GREEDY_BELOW = 1e-5  # temperatures this small divide logits into overflow: they mean greedy


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SamplingParamsError(f"{name} must be in [{low}, {high}], got {value}")


def _check_float(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise SamplingParamsError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, in the vLLM style users know.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 switch those filters off. A seed makes
    the request reproducible whatever else is in the batch (it gets its own generator). Stop
    strings end the text before the match (unless include_stop_str_in_output); stop token ids and
    EOS (unless ignore_eos) end it with the token kept in token_ids but not in the text.
    logprobs=k returns, for each generated token, the log-probabilities (of the model's raw
    distribution, before temperature and filters) of the k most likely tokens and of the chosen one.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    # logits processors (runtime/logits_processors.py says exactly what each does)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    json_schema: dict | bool | None = None  # the output must be JSON of this schema (True: any JSON object)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in self.stop if s]
        if len(self.stop) > MAX_STOPS:
            raise SamplingParamsError(f"stop takes at most {MAX_STOPS} strings, got {len(self.stop)}")
        _check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        _check_float("temperature", self.temperature, 0.0, 1e4)
        _check_int("top_k", self.top_k, -1, INT32_MAX)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_MAX)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise SamplingParamsError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0, INT32_MAX)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise SamplingParamsError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases")
            for token, bias in self.logit_bias.items():
                _check_int("logit_bias token id", token, 0, INT32_MAX)
                _check_float(f"logit_bias[{token}]", bias, -100.0, 100.0)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.json_schema is not None and self.json_schema is not True and not isinstance(self.json_schema, dict):
            raise SamplingParamsError(f"json_schema must be a JSON Schema object or true, got {self.json_schema!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
