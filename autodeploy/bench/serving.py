"""`autodeploy bench --url URL`: N concurrent streaming clients against any OpenAI-compatible server.

Each client takes the next request from a shared list and streams it from /v1/completions
(temperature 0, ignore_eos so every request runs its full length, stream_options.include_usage for
the token count where the server gives it). Timestamps per SSE chunk give TTFT, inter-token latency
(the gaps between chunks, divided by the tokens a chunk holds when usage tells) and end-to-end
latency; output tok/s is all output tokens over the run's wall time. A client may be told to leave
mid-stream (the load test's disconnecting third); such requests are counted apart, not as errors.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

from .metrics import percentile


@dataclass
class ClientRequest:
    prompt: str
    max_tokens: int
    leave_after: int | None = None  # chunks read before the client disconnects (None: to the end)


@dataclass
class ClientResult:
    text: str = ""
    chunk_times: list[float] = field(default_factory=list)  # seconds since the request was sent
    output_tokens: int = 0
    error: str | None = None
    left: bool = False


def word_prompts(n: int, words: int, seed: int) -> list[str]:
    """n prompts of `words` random common words (any tokenizer makes roughly a token of each)."""
    vocab = ("the of and to in is was for on that with as by at from it an be this are or have not but had "
             "they his which one you were her all she there would their we him been has when who will more no "
             "if out so said what up its about into than them can only other new some could time these two may "
             "then do first any my now such like our over man me even most made after also did many before").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict, req: ClientRequest) -> ClientResult:
    result, start = ClientResult(), time.perf_counter()
    try:
        async with client.stream("POST", url, json={**body, "prompt": req.prompt, "max_tokens": req.max_tokens}) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"].get("message"))[:200]
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                text = "".join(c.get("text") or "" for c in event.get("choices") or [])
                if text:
                    result.text += text
                    result.chunk_times.append(time.perf_counter() - start)
                    if req.leave_after is not None and len(result.chunk_times) >= req.leave_after:
                        result.left = True
                        return result  # leaving the block closes the connection mid-stream
    except (httpx.HTTPError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
    result.output_tokens = result.output_tokens or len(result.chunk_times)
    return result


async def run_clients(base_url: str, model: str | None, requests: list[ClientRequest], concurrency: int,
                      api_key: str | None = None, timeout_s: float = 600,
                      duration_s: float | None = None) -> tuple[list[ClientResult | None], float]:
    """Every request's result (in order) and the run's wall time, `concurrency` clients at once; with
    `duration_s`, clients take no new request after that many seconds (the rest stay None)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            **({"model": model} if model else {})}
    results: list[ClientResult | None] = [None] * len(requests)
    order = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        async def client_loop() -> None:
            for i in order:
                if duration_s is not None and time.perf_counter() - start > duration_s:
                    return
                results[i] = await _stream_one(client, base_url.rstrip("/") + "/v1/completions", body, requests[i])

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def _stats_ms(values: list[float]) -> dict[str, float]:
    return {f"p{p}": percentile([v * 1e3 for v in values], p) for p in (50, 90, 99)}


def summarize(results: list[ClientResult | None], wall_s: float) -> dict:
    results = [r for r in results if r is not None]
    done = [r for r in results if r.error is None and not r.left]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.output_tokens for r in done)
    return {"requests": len(results), "completed": len(done), "left_mid_stream": sum(r.left for r in results),
            "errors": sum(r.error is not None for r in results),
            "error_samples": sorted({r.error for r in results if r.error})[:5],
            "wall_s": wall_s, "request_throughput_per_s": len(done) / wall_s, "output_tokens": tokens,
            "output_tok_s": tokens / wall_s,
            "ttft_ms": _stats_ms([r.chunk_times[0] for r in done if r.chunk_times]),
            "itl_ms": _stats_ms(itl), "e2e_ms": _stats_ms([r.chunk_times[-1] for r in done if r.chunk_times])}


def print_summary(url: str, s: dict) -> None:
    print(f"autodeploy bench --url {url}: {s['completed']}/{s['requests']} requests completed, {s['errors']} errors "
          f"in {s['wall_s']:.1f} s")
    print(f"  {s['request_throughput_per_s']:.2f} req/s, {s['output_tok_s']:.1f} output tok/s")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        print(f"  {name[:-3].upper():5s} p50/p90/p99 ms: " + "/".join(f"{s[name][p]:.1f}" for p in ("p50", "p90", "p99")))
    for e in s["error_samples"]:
        print(f"  error: {e}")
