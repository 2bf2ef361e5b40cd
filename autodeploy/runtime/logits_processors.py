"""Per-request changes to the logits before sampling: repetition / frequency / presence penalties,
logit_bias and min_tokens, with vLLM's (and OpenAI's) meanings:
  - repetition_penalty r (1: off) divides positive logits by r and multiplies negative ones by r, for
    every token seen in the prompt or the output (as HF transformers' RepetitionPenaltyLogitsProcessor);
  - frequency_penalty f and presence_penalty p subtract f * count + p * (count > 0), counts over the
    output tokens only;
  - logit_bias adds its value to the named tokens' logits;
  - min_tokens forbids EOS (unless ignore_eos) and the stop token ids until that many tokens exist;
  - json_schema masks every token its grammar does not allow (structured_output.py).
Step n is launched before step n - 1's token reaches the host (engine.py), so each request's output
token counts live on the device and are bumped there with every step's samples: nothing waits.
Only requests that ask for one of these pay for it (a per-row loop).
"""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams
from .sequence import Sequence
from .structured_output import GrammarConstraints


def wants_processing(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 or p.logit_bias
                or p.min_tokens or p.json_schema is not None)


class LogitsProcessors:
    def __init__(self, eos_ids: set[int], tokenizer=None):
        self.eos_ids = eos_ids
        self.grammars = GrammarConstraints(tokenizer)  # json_schema, applied last (no bias can unmask)
        self._counts: dict[str, torch.Tensor] = {}  # request id -> output token counts [V] (float32, device)
        self._prompt: dict[str, torch.Tensor] = {}  # request id -> prompt tokens [V] (bool), for repetition

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`logits` [B, V] (row i samples seqs[i]) with each request's changes; unchanged when none asks."""
        rows = [i for i, s in enumerate(seqs) if wants_processing(s.params)]
        if not rows:
            return logits
        logits = logits.float().clone()
        for i in rows:
            seq, p, row = seqs[i], seqs[i].params, logits[i]
            counts = self._counts_of(seq, row)
            if p.repetition_penalty != 1:
                seen = (counts > 0) | self._prompt[seq.request_id]
                row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty),
                                  row)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=row.device)
                row = row.index_add(0, ids, torch.tensor(list(p.logit_bias.values()), device=row.device))
            if len(seq.output_ids) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
                if banned:
                    row = row.index_fill(0, torch.tensor(sorted(banned), device=row.device), float("-inf"))
            logits[i] = row
        self.grammars.apply(logits, seqs)
        return logits

    def _counts_of(self, seq: Sequence, row: torch.Tensor) -> torch.Tensor:
        if seq.request_id not in self._counts:
            self._counts[seq.request_id] = torch.zeros(row.shape[-1], dtype=torch.float32, device=row.device)
            prompt = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
            prompt[torch.tensor(seq.prompt_ids, device=row.device)] = True
            self._prompt[seq.request_id] = prompt
        return self._counts[seq.request_id]

    def record(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Count this step's sampled tokens (device tensor [B]) for the requests that track them."""
        for i, seq in enumerate(seqs):
            counts = self._counts.get(seq.request_id)
            if counts is not None:
                counts.index_add_(0, tokens[i:i + 1], torch.ones(1, device=counts.device))

    def drop(self, request_id: str) -> None:
        self.grammars.drop(request_id)
        self._counts.pop(request_id, None)
        self._prompt.pop(request_id, None)
