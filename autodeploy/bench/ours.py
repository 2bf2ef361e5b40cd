"""Our side of a benchmark: an engine over the optimized model, driven request by request.

The engine is built directly (not through `LLM`) so that a config folder without a tokenizer
works; everything else is the in-flight runtime as users run it: requests are submitted at once,
every step is scheduled, packed, run (decode steps through CUDA graphs when captured), sampled
greedily on the device and detokenized.
"""

from __future__ import annotations

import time
from typing import Callable

from autodeploy.errors import RequestError
from autodeploy.llm import resolve_max_num_tokens
from autodeploy.optimizer import OptimizedModel
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.settings import EngineSettings
from autodeploy.runtime.sampling_params import SamplingParams

from .device import now
from .metrics import Run
from .tokenizer import bench_tokenizer


def make_engine(opt: OptimizedModel, settings: EngineSettings) -> Engine:
    config = opt.source.config.get_text_config()
    return Engine(opt.gm, bench_tokenizer(opt.source), set(), resolve_max_num_tokens(opt, settings),
                  getattr(config, "max_position_embeddings", None))


def run(engine: Engine, prompts: list[list[int]], output_lens: list[int],
        after_step: Callable[[], None] | None = None, warm_prefix: list[int] | None = None) -> Run:
    """Submit every request at once, step until all are done; timestamps of every output token.

    Each pass starts with an empty prefix cache (the same prompts again would find theirs cached);
    `warm_prefix` is then run first, untimed, as a request of its own (a system prompt seen before)."""
    engine.reset_prefix_cache()
    if warm_prefix:
        _drain(engine, {engine.add_request(warm_prefix, SamplingParams(max_tokens=1, ignore_eos=True)): 0}, [[]])
    device = engine.executor.device
    start = now(device)
    index = {engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)): i
             for i, (p, n) in enumerate(zip(prompts, output_lens))}
    times: list[list[float]] = [[] for _ in prompts]
    _drain(engine, index, times, start, after_step)
    return Run(times, now(device) - start)


def _drain(engine: Engine, index: dict[str, int], times: list[list[float]], start: float = 0.0,
           after_step: Callable[[], None] | None = None) -> None:
    """Step until the requests of `index` (id -> row of `times`) end, stamping each output token."""
    left = len(index)
    while left:
        outputs = engine.step()
        t = time.perf_counter() - start  # no device sync: the step's tokens are on the host, the next step runs
        for out in outputs:
            if out.finish_reason == "error":
                raise RequestError(f"request {out.request_id} failed: {out.error}")
            times[index[out.request_id]] += [t] * len(out.delta_token_ids)
            left -= out.finished
        if after_step is not None:
            after_step()
