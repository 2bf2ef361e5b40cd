"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, streaming, and chat.

`LLM(model=None, recipe=None, overrides=(), **kwargs)` optimizes the model with the recipe (which
must include `insert_kv_cache`) and starts an engine on the result. Settings come in two kinds:
  - runtime settings (EngineSettings: max_batch_size, max_num_tokens, max_seq_len, seed,
    enable_prefix_caching, max_prefill_tokens_with_decodes, cuda_graph_batch_sizes,
    cuda_graph_prefill_tokens): the recipe's `runtime` section, overridden by keywords of the same names,
    or of vLLM's / TensorRT-LLM's (llm_keywords.py: max_model_len, dtype, gpu_memory_utilization,
    enforce_eager, ...);
  - recipe overrides, as dotted keyword keys `LLM(model, **{"transforms.insert_kv_cache.block_size": 16})`
    or as `overrides=["transforms.insert_kv_cache.block_size=16"]`, what `autodeploy optimize` takes.
`LLM.from_optimized(optimized_model, **runtime settings)` skips the optimization.
`LLM(model, tensor_parallel_size=N, enable_expert_parallel=...)` shards the model over N ranks
(autodeploy/parallel): N - 1 worker processes (or torchrun's), this process being rank 0; they stop
with `shutdown()` or when the LLM is collected or the interpreter exits.
Requests from every entry point share one engine, so they batch together; each consumer steps the
engine when it has nothing to read and outputs are routed to the request they belong to.
"""

from __future__ import annotations

import asyncio
import numbers
import os
import weakref
from collections import deque
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Sequence

from .errors import PromptError, RecipeError
from .runtime.engine import Engine
from .runtime.executor import ModelExecutor
from .runtime.settings import EngineSettings
from .runtime.outputs import RequestOutput
from .runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from .optimizer import OptimizedModel

__all__ = ["LLM", "SamplingParams", "RequestOutput"]

Prompt = str | list[int]
Message = dict[str, str]


def chat_prompt_ids(tokenizer, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation (and the tools it may call) through the tokenizer's chat template,
    ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model's tokenizer has no chat template; use generate() with a plain prompt")
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string or a list of token ids) or several, as a list of prompts."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _eos_ids(source, tokenizer) -> set[int]:
    """EOS ids from the generation config (may be several) and the tokenizer."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    try:
        eos = GenerationConfig.from_pretrained(source.path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


LARGE_GPU_BYTES = 70 * 2**30


def default_max_num_tokens(model: OptimizedModel) -> int:
    """Tokens per forward when runtime.max_num_tokens is 0: 8,192 on a GPU of 70 GiB or more, else 2,048;
    at most export.max_seq_len (the graph's token dimension).

    On an H200 (BENCHMARKS.md session 19) an 8B's batch of 64 prompts of 128 tokens then prefills in one
    step instead of a 2,048-token step and ~1,024-token steps beside the first decodes: +5 % batch-64
    output tok/s (bf16 and FP8), inter-token p99 27 -> 6 ms. vLLM's defaults on such GPUs are 8,192
    (server) and 16,384 (offline); the step's activations stay within the 10 % the KV cache leaves free."""
    import torch

    device = model.device
    large = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= LARGE_GPU_BYTES
    return min(8192 if large else 2048, model.recipe.export.max_seq_len)


def resolve_max_num_tokens(model: OptimizedModel, settings: EngineSettings) -> EngineSettings:
    """`settings` with max_num_tokens 0 replaced by the default, checked against the graph's token dimension."""
    export_max = model.recipe.export.max_seq_len  # the graph's token dim: a forward's upper bound
    settings.max_num_tokens = settings.max_num_tokens or default_max_num_tokens(model)
    if settings.max_num_tokens > export_max:
        raise RecipeError(f"max_num_tokens {settings.max_num_tokens} exceeds the graph's export.max_seq_len "
                          f"{export_max}")
    return settings


def engine_settings(model: OptimizedModel, overrides: dict) -> EngineSettings:
    """The recipe's runtime section with `overrides` (keyword settings) on top, checked against the graph."""
    return resolve_max_num_tokens(model, replace(model.recipe.runtime, **overrides))


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, recipe=None, *, overrides: Sequence[str] = (),
                 progress: bool = False, **kwargs):
        """Keywords: runtime settings, vLLM / TensorRT-LLM names (llm_keywords.py; e.g.
        `quantization`: fp8 | int8 | int4 | None = what the checkpoint says, else unquantized;
        `kv_cache_dtype`: auto | fp8), or dotted recipe keys."""
        from .llm_keywords import translate
        from .optimizer import optimize_model
        from .recipe import load_recipe

        runtime, recipe_overrides = translate(kwargs)
        recipe = load_recipe(recipe, list(overrides) + recipe_overrides)
        replace(recipe.runtime, **runtime)  # keyword settings are checked (EngineSettings) before the build
        self._ranks = None
        if recipe.parallel.tensor_parallel_size > 1:
            from .parallel.ranks import Ranks, for_rank

            self._ranks = Ranks.start(model, recipe, runtime)  # a torchrun worker serves in here, then exits
            weakref.finalize(self, self._ranks.shutdown)
            recipe = for_rank(recipe, 0)
        self._start(optimize_model(model, recipe, progress=progress), runtime)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (if any); the LLM cannot run after this."""
        if self._ranks is not None:
            self._ranks.shutdown()

    @classmethod
    def from_optimized(cls, model: OptimizedModel, **settings) -> "LLM":
        """An LLM over an already optimized model (its recipe must have included insert_kv_cache)."""
        llm = cls.__new__(cls)
        llm._ranks = None
        llm._start(model, settings)
        return llm

    def _start(self, model: OptimizedModel, overrides: dict) -> None:
        """Start the engine with the recipe's runtime section, `overrides` (keyword settings) on top."""
        from .loading import load_tokenizer_or_none
        from .runtime.kv_cache import kv_cache_of

        if kv_cache_of(model.gm) is None:
            raise RecipeError("LLM needs a recipe with the insert_kv_cache transform (enabled)")
        settings = engine_settings(model, overrides)
        self.model = model
        self.tokenizer = load_tokenizer_or_none(model.source)
        config = model.source.config.get_text_config()
        factory = ModelExecutor
        ranks = self._ranks
        if ranks is not None:
            from .parallel.executor import TensorParallelExecutor
            from .parallel.ranks import agree_on_cache_blocks

            agree_on_cache_blocks(kv_cache_of(model.gm), ranks.channel)
            factory = partial(TensorParallelExecutor, channel=ranks.channel)
        self.engine = Engine(model.gm, self.tokenizer, _eos_ids(model.source, self.tokenizer),
                             settings, getattr(config, "max_position_embeddings", None),
                             getattr(config, "vocab_size", None), factory)
        self._queues: dict[str, deque[RequestOutput]] = {}

    # --- requests -----------------------------------------------------------------------------
    def _submit(self, prompt: Prompt, params: SamplingParams | None) -> str:
        params = params if params is not None else SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(f"{self.model.source.name} has no tokenizer: pass prompts as lists of token ids")
            request_id = self.engine.add_request(self.tokenizer(prompt)["input_ids"], params, prompt=prompt)
        else:
            ids = list(prompt) if isinstance(prompt, (list, tuple)) else None
            if ids is None or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
                raise PromptError(f"a prompt is a string or a list of token ids (ints), got {type(prompt).__name__}"
                                  + ("" if ids is None else " holding other values"))
            request_id = self.engine.add_request([int(t) for t in ids], params)
        self._queues[request_id] = deque()
        return request_id

    def _step(self) -> None:
        for out in self.engine.step():
            queue = self._queues.get(out.request_id)
            if queue is not None:  # else its consumer has gone (aborted stream)
                queue.append(out)

    def _next(self, request_id: str) -> RequestOutput:
        queue = self._queues[request_id]
        while not queue:
            self._step()
        out = queue.popleft()
        if out.finished:
            del self._queues[request_id]
        return out

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's blocks that no request in flight holds; how many were dropped."""
        return self.engine.reset_prefix_cache()

    # --- entry points -------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Final outputs, one per prompt and in order (a prompt is a string or a list of token ids)."""
        prompts = as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise PromptError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self._submit(p, sp) for p, sp in zip(prompts, params)]
        finals = {}
        for request_id in ids:
            out = self._next(request_id)
            while not out.finished:
                out = self._next(request_id)
            finals[request_id] = out
        return [finals[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request as it goes; `delta_text` is the new text of each."""
        request_id = self._submit(prompt, sampling_params)
        try:
            while True:
                out = self._next(request_id)
                yield out
                if out.finished:
                    return
        finally:  # a consumer that stops early aborts its request
            if request_id in self._queues:
                self.engine.abort(request_id)
                self._queues.pop(request_id)

    async def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                             streaming: bool = True) -> AsyncIterator[RequestOutput]:
        """Async version of `stream` (every output) or, with streaming=False, just the final output.

        Each engine step yields to the event loop, so concurrent requests batch together. Closing it
        early (`aclose`, e.g. a server whose client went away) aborts the request at once."""
        outputs = self.stream(prompt, sampling_params)
        try:
            for out in outputs:
                if streaming or out.finished:
                    yield out
                await asyncio.sleep(0)
        finally:
            outputs.close()

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Reply to one conversation (a list of {'role', 'content'}) or to several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([chat_prompt_ids(self.tokenizer, c) for c in conversations], sampling_params)
