"""The HF transformers peers: eager `generate` (dynamic cache) and static cache + torch.compile.

Same shapes as our run: requests go in batches of the engine's batch size, in order, left-padded
to the batch's longest prompt, each batch generating its longest output (`min_new_tokens` forces
the length; random weights never stop early either). Only the tokens a request asked for count.
Token timestamps come from a streamer: generate hands it every new token after `.cpu()`, a
device synchronization, so the timestamps are synchronized like ours.

With --config-only the HF model is built from the config on the device with the same seed: its
random weights differ from ours (different init order), which does not change the speed.
"""

from __future__ import annotations

import time

import torch

from autodeploy.loading import ModelSource

from .device import now
from .metrics import Run

BASELINES = ("hf", "hf-compile")


def build_hf_model(source: ModelSource, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM

    if source.weight_files:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                     trust_remote_code=source.trust_remote_code).to(device)
    else:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(source.config, dtype=dtype,
                                                     trust_remote_code=source.trust_remote_code)
    return model.eval()


class _TokenClock:
    """A generate() streamer that only notes when each step's tokens reached the host."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:  # the first put is the prompt
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def run(model, prompts: list[list[int]], output_lens: list[int], batch_size: int, baseline: str) -> Run:
    """One pass over all requests, batch after batch; timestamps relative to the first submission."""
    device = model.device
    times: list[list[float]] = []
    start = now(device)
    for first in range(0, len(prompts), batch_size):
        batch, lens = prompts[first:first + batch_size], output_lens[first:first + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        clock = _TokenClock()
        extra = {"cache_implementation": "static"} if baseline == "hf-compile" else {"disable_compile": True}
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, pad_token_id=0, streamer=clock, **extra)
        stamps = [t - start for t in clock.times]
        times += [stamps[:n] for n in lens]
    return Run(times, now(device) - start)
