"""Per-request generation settings, validated up front so a bad request fails before it queues."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
