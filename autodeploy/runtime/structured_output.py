"""JSON-constrained decoding through llguidance: a request with `json_schema` (a JSON Schema, or True
for any JSON object) may only sample tokens its grammar allows, and EOS once the JSON is complete.

Why llguidance (not xgrammar): it is installed and maintained (guidance's Rust core, also used by
vLLM and llama.cpp), builds the token mask for a step in microseconds from the HF tokenizer without
precomputation per schema, and supports JSON Schema, regex and Lark through one matcher type.

The mask of step n depends on every token so far, so a constrained request cannot ride the engine's
one-step overlap: while any is running, the engine collects step n - 1's tokens before scheduling
step n (engine.py). Requests without a schema pay nothing.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


class GrammarConstraints:
    def __init__(self, tokenizer):
        self._hf_tokenizer = tokenizer
        self._ll_tokenizer = None  # built on first use (about a second for a 50k vocabulary)
        self._matchers: dict[str, tuple[object, list[int]]] = {}  # request id -> (matcher, [tokens consumed])

    @property
    def active(self) -> bool:
        return bool(self._matchers)

    def admit(self, seq: Sequence) -> str | None:
        """Compile the request's grammar; an error message when it cannot be used."""
        schema = seq.params.json_schema
        if schema is None:
            return None
        if self._hf_tokenizer is None:
            return "json_schema needs the model's tokenizer"
        import llguidance
        import llguidance.hf

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"} if schema is True else schema)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar)
        if matcher.is_error():
            return f"json_schema: {matcher.get_error()}"
        self._matchers[seq.request_id] = (matcher, [0])
        return None

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Mask, in place, the rows of constrained requests (float32 logits [B, V])."""
        import llguidance.torch as lt

        for i, seq in enumerate(seqs):
            entry = self._matchers.get(seq.request_id)
            if entry is None:
                continue
            matcher, consumed = entry
            for token in seq.output_ids[consumed[0]:]:  # all on the host: the engine synced for us
                matcher.consume_token(token)
            consumed[0] = len(seq.output_ids)
            n = self._ll_tokenizer.vocab_size
            mask = lt.allocate_token_bitmask(1, n)
            lt.fill_next_token_bitmask(matcher, mask, 0)
            row = logits[i:i + 1, :n].cpu()
            lt.apply_token_bitmask_inplace(row, mask)
            logits[i, :n] = row[0].to(logits.device)
            logits[i, n:] = float("-inf")

    def drop(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
