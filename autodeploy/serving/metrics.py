"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Requests by endpoint and status; time to first token, inter-token latency and end-to-end latency as
histograms; running and waiting requests and KV-cache blocks in use, read from the engine when
scraped (a read of a few Python ints: racing the engine thread costs at most a stale value); and the
event loop's lag (how late it runs a 100 ms timer), because a stalled loop delays every request at
once, /health included: that is how a 1.4 s garbage collection over the model's objects was found.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..runtime.engine import Engine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, engine: Engine, waiting_fn):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("autodeploy_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("autodeploy_time_to_first_token_seconds", "time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("autodeploy_inter_token_latency_seconds", "time between a request's outputs",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("autodeploy_e2e_request_latency_seconds", "request latency, first byte in to last out",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("autodeploy_generation_tokens", "tokens generated", registry=r)
        self.loop_lag = Histogram("autodeploy_event_loop_lag_seconds", "how late the server's event loop runs a timer",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("autodeploy_requests_running", "requests holding KV cache", registry=r).set_function(
            lambda: len(engine.scheduler.running))
        Gauge("autodeploy_requests_waiting", "requests admitted but not yet running", registry=r).set_function(
            waiting_fn)
        Gauge("autodeploy_kv_blocks_used", "KV-cache blocks in use", registry=r).set_function(
            lambda: engine.blocks.num_blocks - engine.blocks.num_free)
        Gauge("autodeploy_kv_blocks_total", "KV-cache blocks", registry=r).set(engine.blocks.num_blocks)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def watch_event_loop(self, period_s: float = 0.1) -> None:
        """Observe the loop's lag every `period_s`, until cancelled."""
        while True:
            start = time.perf_counter()
            await asyncio.sleep(period_s)
            self.loop_lag.observe(time.perf_counter() - start - period_s)


class RequestTimer:
    """Feeds one request's TTFT, ITL and end-to-end latency to the histograms as outputs arrive."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first = True

    def output(self, new_tokens: int) -> None:
        if not new_tokens:
            return
        now = time.perf_counter()
        (self.metrics.ttft if self.first else self.metrics.itl).observe(now - self.last)
        self.metrics.tokens.inc(new_tokens)
        self.first, self.last = False, now

    def done(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)
