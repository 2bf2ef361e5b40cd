"""Batched token sampling with per-request settings.

Temperature, top-k and top-p are applied to the whole batch at once (per-row parameters as
tensors); only the final draw is per row, because each seeded request draws from its own
generator - that is what makes a seeded request reproducible whatever it is batched with.
"""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted, filtered probabilities [B, V] and the vocabulary index of each sorted column.

    temperature [B] (> 0), top_k [B] (<= 0: off), top_p [B] (1: off). The most likely token always
    survives both filters.
    """
    sorted_logits, index = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return probs / probs.sum(-1, keepdim=True), index


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax; on CUDA a split kernel (torch's takes ~45 us for one 128k-entry row)."""
    if logits.is_cuda:
        from autodeploy.kernels.triton_argmax import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


class Sampler:
    """Picks the next token of every row; greedy rows take the argmax and use no randomness."""

    def __init__(self, seed: int | None = None):
        self._seed = seed if seed is not None else int(torch.randint(2**62, ()).item())
        self._shared: dict[torch.device, torch.Generator] = {}

    def generator_for(self, params: SamplingParams, device: torch.device) -> torch.Generator | None:
        """A request's own generator when it has a seed; None means the sampler's shared one."""
        if params.seed is None or params.greedy:
            return None
        return torch.Generator(device=device).manual_seed(params.seed)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            self._shared[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._shared[device]

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        """Next token for each row of `logits` [B, V], as a device tensor [B] (no host sync)."""
        tokens = _argmax(logits)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            device = logits.device
            sub = [params[i] for i in rows]
            probs, index = filter_logits(
                logits[rows],
                torch.tensor([p.temperature for p in sub], device=device),
                torch.tensor([p.top_k for p in sub], device=device),
                torch.tensor([p.top_p for p in sub], device=device),
            )
            for j, i in enumerate(rows):
                gen = generators[i] or self._shared_generator(device)
                tokens[i] = index[j, torch.multinomial(probs[j], 1, generator=gen)]
        return tokens
