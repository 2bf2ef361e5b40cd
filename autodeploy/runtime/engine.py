"""The engine loop: schedule, pack, run the cached graph, sample, detokenize, stop, report.

Single-threaded, but the host and the device overlap: `step()` launches step n (forward and
sampling stay on the device; the tokens head for pinned host memory) and only then reads the
tokens of step n - 1, detokenizes them and checks the stop conditions while step n runs. Step n
was scheduled before step n - 1's tokens were known, so their places hold PENDING and the device
feeds them in (executor.py). The price: a request that stops on a token (EOS, stop string) has
already been scheduled for one more step, whose token is dropped. Length limits are known ahead
and cost nothing. Callers (autodeploy.llm) drive `step()` and route the outputs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule

from .batch import Chunk
from .block_manager import BlockManager
from .cuda_graphs import buckets_to_capture, plan_buckets
from .detokenizer import IncrementalDetokenizer
from .executor import ModelExecutor
from .kv_cache import STATE_SLOTS_KEY
from .logits_processors import LogitsProcessors
from .outputs import RequestOutput
from .prefix_cache import PrefixCache, PrefixCacheStats
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, Scheduler
from .sequence import PENDING, Sequence, Status
from .settings import EngineSettings
from .stopping import find_stop_string, held_back, is_stop_token


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    text: str = ""
    shown_chars: int = 0
    shown_tokens: int = 0
    resolved: int = 0  # output tokens the host has read (the rest are PENDING)
    logprobs: list[dict[int, float]] | None = None  # per resolved token, when the request asks


@dataclass
class _StepLogprobs:
    """A step's log-probabilities (raw distribution): the sampled tokens' [n], the top k's values and ids [n, k]."""

    chosen: torch.Tensor
    values: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, tokens: torch.Tensor, k: int) -> "_StepLogprobs":
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
        return cls(logprobs.gather(1, tokens[:, None])[:, 0], values, ids)

    def to_host(self) -> "_StepLogprobs":
        return _StepLogprobs(_to_host(self.chosen), _to_host(self.values), _to_host(self.ids))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy into pinned host memory (the step's event says when it has landed)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@dataclass
class _Launched:
    """A step on its way: which output slot each sampled row fills, and the tokens' host copy."""

    slots: list[tuple[_Request, int]]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: _StepLogprobs | None = None


class Engine:
    def __init__(self, gm: GraphModule, tokenizer, eos_ids: set[int], settings: EngineSettings,
                 model_max_len: int | None = None, vocab_size: int | None = None,
                 executor_factory: Callable[..., ModelExecutor] = ModelExecutor):
        self.executor = executor_factory(gm, settings.max_batch_size)  # tensor parallel: rank 0's executor
        pool = self.executor.pool
        graph_sizes = buckets_to_capture(tuple(settings.cuda_graph_batch_sizes), settings.max_batch_size,
                                         settings.max_num_tokens)
        buckets = plan_buckets(graph_sizes, tuple(settings.cuda_graph_prefill_tokens), settings.max_batch_size,
                               settings.max_num_tokens)
        use_graphs = self.executor.device.type == "cuda" and bool(buckets) and pool.num_blocks > 1
        num_blocks = pool.num_blocks - 1 if use_graphs else pool.num_blocks  # the last: graphs' scratch block
        self.blocks = BlockManager(num_blocks, pool.block_size)
        # A hybrid model's state slot is its first block, and a state after a prefix is not stored:
        # such a model recomputes every prompt (kv_cache.STATE_SLOTS_KEY, set by insert_state_cache).
        caching = settings.enable_prefix_caching and not gm.meta.get(STATE_SLOTS_KEY)
        self.prefix_cache = PrefixCache(self.blocks, salt=str(pool.k_caches[0].dtype)) if caching else None
        self.scheduler = Scheduler(self.blocks, settings.max_batch_size, settings.max_num_tokens, self.prefix_cache,
                                   settings.max_prefill_tokens_with_decodes)
        self.sampler = Sampler(settings.seed)
        self.processors = LogitsProcessors(eos_ids, tokenizer)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size  # token ids past it would index out of the embedding: refused
        self.cache_tokens = num_blocks * pool.block_size
        self.max_seq_len = min(settings.max_seq_len or model_max_len or self.cache_tokens, self.cache_tokens)
        if use_graphs:
            self.executor.capture_graphs(buckets, self.blocks.blocks_for(self.max_seq_len),
                                         scratch_block=num_blocks)
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []
        self._in_flight: _Launched | None = None
        self._ids = itertools.count()
        self.num_preemptions = 0  # how often the cache ran out (each one costs a recompute)
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (not taken from the cache)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request. One that can never run ends at once with finish_reason 'error'."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id '{request_id}' is already in flight")
        seq = Sequence(request_id, prompt, list(prompt_ids), params, arrival=next(self._ids),
                       generator=self.sampler.generator_for(params, self.executor.device))
        error = self._admission_error(seq)
        if error is not None:
            seq.finish_reason, seq.error = "error", error
            self._pending.append(self._output(_Request(seq, None), finished=True))
            return request_id
        self._requests[request_id] = _Request(
            seq, IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, params.skip_special_tokens),
            logprobs=[] if params.logprobs is not None else None)
        self.scheduler.add(seq)
        return request_id

    def _admission_error(self, seq: Sequence) -> str | None:
        n = len(seq.prompt_ids)
        if n == 0:
            return "empty prompt"
        if n > self.max_seq_len:
            return (f"prompt has {n} tokens, more than max_seq_len {self.max_seq_len} "
                    f"(the KV cache holds {self.cache_tokens} tokens: {self.blocks.num_blocks} blocks of "
                    f"{self.blocks.block_size})")
        if self.vocab_size is not None:
            named = seq.prompt_ids + list(seq.params.stop_token_ids) + list(seq.params.logit_bias or ())
            bad = [t for t in named if not 0 <= t < self.vocab_size]
            if bad:
                return f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        return self.processors.grammars.admit(seq)

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, "abort")
            self._pending.append(self._output(req, finished=True))

    def reset_prefix_cache(self) -> int:
        """Drop the cached blocks no request holds (e.g. after new weights); how many were dropped."""
        return self.blocks.reset_prefix_cache()

    def stats(self) -> dict[str, float]:
        """Counters for monitoring: cache blocks, prefix-cache hits, preemptions."""
        cache = self.prefix_cache.stats if self.prefix_cache is not None else PrefixCacheStats()
        return {"num_blocks": self.blocks.num_blocks, "free_blocks": self.blocks.num_free,
                "cached_blocks": self.blocks.num_cached, "evicted_blocks": self.blocks.num_evictions,
                "prefix_cache_queried_tokens": cache.queried_tokens,
                "prefix_cache_hit_tokens": cache.hit_tokens, "prefix_cache_hit_rate": cache.hit_rate,
                "prompt_tokens_computed": self.num_prompt_tokens_computed, "num_preemptions": self.num_preemptions}

    def step(self) -> list[RequestOutput]:
        """Launch the next forward, then report the requests the previous one moved (they got a
        token or ended)."""
        outputs, self._pending = self._pending, []
        if self._in_flight is not None and self.processors.grammars.active:  # their masks need the last token
            outputs += self._collect(self._in_flight)
            self._in_flight = None
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        launched = self._launch(plan.chunks) if plan.chunks else None
        if self._in_flight is not None:
            outputs += self._collect(self._in_flight)
        self._in_flight = launched
        return outputs

    def _launch(self, chunks: list[ScheduledChunk]) -> _Launched:
        packed = []
        for c in chunks:
            seq, start, end = c.seq, c.seq.num_computed, c.seq.num_computed + c.num_tokens
            fed = end == seq.num_tokens and seq.output_ids and seq.output_ids[-1] == PENDING
            packed.append(Chunk(seq.token_ids(start, end), start, seq.block_ids, feed_row=seq.feed_row if fed else -1))
            self.num_prompt_tokens_computed += max(min(end, len(seq.prompt_ids)) - start, 0)
        logits = self.executor.last_token_logits(packed)
        sampling = [i for i, c in enumerate(chunks) if c.completes]
        if len(sampling) < len(chunks):  # a prompt chunk that does not reach its end samples nothing
            logits = logits[sampling]
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        seqs = [chunks[i].seq for i in sampling]
        slots, logprobs = [], None
        if seqs:
            tokens = self.sampler.sample(self.processors.apply(logits, seqs), [s.params for s in seqs],
                                         [s.generator for s in seqs])
            self.processors.record(seqs, tokens)
            self.executor.remember(tokens)
            k = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=None)
            if k is not None:
                logprobs = _StepLogprobs.of(logits, tokens, k).to_host()
        else:
            tokens = torch.empty(0, dtype=torch.long)
        for row, seq in enumerate(seqs):
            seq.output_ids.append(PENDING)
            seq.feed_row = row
            seq.final = len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_seq_len
            slots.append((self._requests[seq.request_id], len(seq.output_ids) - 1))
        host, ready = _to_host(tokens), None
        if tokens.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(slots, host, ready, logprobs)

    def _collect(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for them) and move its requests on."""
        if launched.ready is not None:
            launched.ready.synchronize()
        outputs = []
        lp = launched.logprobs
        chosen, values, ids = (lp.chosen.tolist(), lp.values.tolist(), lp.ids.tolist()) if lp else ([], [], [])
        for row, ((req, index), token) in enumerate(zip(launched.slots, launched.tokens.tolist())):
            if req.seq.status is Status.FINISHED:  # stopped or aborted after this step was launched
                continue
            req.seq.output_ids[index] = token
            req.resolved = index + 1
            k = req.seq.params.logprobs
            if k is not None:
                entry = dict(zip(ids[row][:k], values[row][:k]))
                entry[token] = chosen[row]
                req.logprobs.append(entry)
            outputs.append(self._accept(req, token))
        return outputs

    def _accept(self, req: _Request, token: int) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        reason = None
        if is_stop_token(params, token, self.eos_ids):
            reason = "stop"
        else:
            try:
                new = req.detokenizer.add(token)
            except Exception as e:  # one request's text failing must not end the step of the others
                seq.error = f"detokenization failed: {e}"
                self._finish(req, "error")
                return self._output(req, finished=True)
            req.text += new
            cut = find_stop_string(req.text, len(new), params.stop, params.include_stop_str_in_output) if new else None
            if cut is not None:
                req.text, reason = req.text[:cut], "stop"
        if reason is None and (req.resolved >= params.max_tokens
                               or len(seq.prompt_ids) + req.resolved >= self.max_seq_len):
            reason = "length"
        if reason is not None:
            self._finish(req, reason)
        return self._output(req, finished=reason is not None)

    def _finish(self, req: _Request, reason: str) -> None:
        del req.seq.output_ids[req.resolved:]  # tokens still in flight are dropped
        req.seq.finish_reason = reason
        self.processors.drop(req.seq.request_id)
        self.scheduler.finish(req.seq)
        del self._requests[req.seq.request_id]

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        """The request's state, with what is new since its last output (stop-string prefixes held back)."""
        seq = req.seq
        visible = req.text if finished else req.text[:len(req.text) - held_back(req.text, seq.params.stop)]
        out = RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_ids, text=visible,
            token_ids=seq.output_ids[:req.resolved], finished=finished, finish_reason=seq.finish_reason, error=seq.error,
            delta_text=visible[req.shown_chars:], delta_token_ids=seq.output_ids[req.shown_tokens:req.resolved],
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens or 0,
        )
        req.shown_chars, req.shown_tokens = len(visible), req.resolved
        return out
