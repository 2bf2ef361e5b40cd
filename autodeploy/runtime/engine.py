"""The engine loop: schedule, pack, run the cached graph, sample, detokenize, stop, report.

Single-threaded and synchronous: `step()` does one forward for everything scheduled and returns
the outputs of the requests that moved. Callers (autodeploy.llm) drive it and route the outputs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch.fx import GraphModule

from .batch import Chunk
from .block_manager import BlockManager
from .cuda_graphs import DEFAULT_BATCH_SIZES, buckets_to_capture
from .detokenizer import IncrementalDetokenizer
from .executor import ModelExecutor
from .outputs import RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .stopping import find_stop_string, held_back, is_stop_token


@dataclass
class EngineSettings:
    max_batch_size: int = 64  # sequences holding KV cache at once
    max_num_tokens: int = 0  # tokens per forward (prefill chunks + decodes); 0 = min(2048, export.max_seq_len)
    max_seq_len: int = 0  # prompt + output; 0 = the model's limit. Always capped by the cache size.
    seed: int | None = None  # seed of the generator shared by unseeded sampling requests
    # Decode batch sizes captured as CUDA graphs (CUDA only); () = always eager.
    cuda_graph_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    text: str = ""
    shown_chars: int = 0
    shown_tokens: int = 0


class Engine:
    def __init__(self, gm: GraphModule, tokenizer, eos_ids: set[int], settings: EngineSettings,
                 model_max_len: int | None = None):
        self.executor = ModelExecutor(gm)
        pool = self.executor.pool
        graph_sizes = buckets_to_capture(tuple(settings.cuda_graph_batch_sizes), settings.max_batch_size,
                                         settings.max_num_tokens)
        use_graphs = self.executor.device.type == "cuda" and bool(graph_sizes) and pool.num_blocks > 1
        num_blocks = pool.num_blocks - 1 if use_graphs else pool.num_blocks  # the last: graphs' scratch block
        self.blocks = BlockManager(num_blocks, pool.block_size)
        self.scheduler = Scheduler(self.blocks, settings.max_batch_size, settings.max_num_tokens)
        self.sampler = Sampler(settings.seed)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.cache_tokens = num_blocks * pool.block_size
        self.max_seq_len = min(settings.max_seq_len or model_max_len or self.cache_tokens, self.cache_tokens)
        if use_graphs:
            self.executor.capture_decode_graphs(graph_sizes, self.blocks.blocks_for(self.max_seq_len),
                                                scratch_block=num_blocks)
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestOutput] = []
        self._ids = itertools.count()
        self.num_preemptions = 0  # how often the cache ran out (each one costs a recompute)

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
            seq, IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, params.skip_special_tokens))
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
        return None

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, "abort")
            self._pending.append(self._output(req, finished=True))

    def step(self) -> list[RequestOutput]:
        """One forward over everything scheduled; outputs of requests that got a token or ended."""
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        if not plan.chunks:
            return outputs
        logits = self.executor.last_token_logits([
            Chunk(c.seq.token_ids(c.seq.num_computed, c.seq.num_computed + c.num_tokens), c.seq.num_computed,
                  c.seq.block_ids)
            for c in plan.chunks
        ])
        sampling = [i for i, c in enumerate(plan.chunks) if c.completes]
        if len(sampling) < len(plan.chunks):  # a prompt chunk that does not reach its end samples nothing
            logits = logits[sampling]
        for c in plan.chunks:
            c.seq.num_computed += c.num_tokens
        seqs = [plan.chunks[i].seq for i in sampling]
        tokens = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens):
            outputs.append(self._append(self._requests[seq.request_id], token))
        return outputs

    def _append(self, req: _Request, token: int) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        seq.output_ids.append(token)
        reason = None
        if is_stop_token(params, token, self.eos_ids):
            reason = "stop"
        else:
            new = req.detokenizer.add(token)
            req.text += new
            cut = find_stop_string(req.text, len(new), params.stop, params.include_stop_str_in_output) if new else None
            if cut is not None:
                req.text, reason = req.text[:cut], "stop"
        if reason is None and (len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_seq_len):
            reason = "length"
        if reason is not None:
            self._finish(req, reason)
        return self._output(req, finished=reason is not None)

    def _finish(self, req: _Request, reason: str) -> None:
        req.seq.finish_reason = reason
        self.scheduler.finish(req.seq)
        del self._requests[req.seq.request_id]

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        """The request's state, with what is new since its last output (stop-string prefixes held back)."""
        seq = req.seq
        visible = req.text if finished else req.text[:len(req.text) - held_back(req.text, seq.params.stop)]
        out = RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_ids, text=visible,
            token_ids=list(seq.output_ids), finished=finished, finish_reason=seq.finish_reason, error=seq.error,
            delta_text=visible[req.shown_chars:], delta_token_ids=seq.output_ids[req.shown_tokens:],
        )
        req.shown_chars, req.shown_tokens = len(visible), len(seq.output_ids)
        return out
