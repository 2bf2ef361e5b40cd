"""Incremental detokenization: the text each new token adds, without re-decoding the whole output.

Decoding one token at a time is wrong (byte-level BPE splits characters over tokens; sentencepiece
drops a leading space at the start of a decode). So each step decodes a short window twice - the
already emitted part and the part with the new tokens - and emits the difference, holding back
while the window ends in an incomplete character (U+FFFD). The window starts a few tokens before
the output so the first generated token is decoded in context.
"""

from __future__ import annotations

_CONTEXT = 5  # prompt tokens decoded with the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.ids)  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # a checkpoint without tokenizer files: token ids only
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]
