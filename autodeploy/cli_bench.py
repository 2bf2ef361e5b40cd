"""`autodeploy bench`: latency and offline-throughput benchmarks of the runtime, with peers and ceiling.

`register(subparsers)` adds the command to the main parser (autodeploy/cli.py wires it in).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import AutoDeployError


class BenchArgumentError(AutoDeployError):
    """A bad workload description (lengths, ranges, lengths file): one line, exit code 2."""


def _workloads(args) -> list:
    from .bench import workload

    if args.shared_prefix is not None:
        return [workload.shared_prefix(args.num_requests or 8, args.shared_prefix, args.input_len, args.output_len)]
    if args.num_requests is not None or args.lengths_file is not None:
        if args.lengths_file is not None:
            return [workload.from_file(args.lengths_file)]
        return [workload.random_lengths(args.num_requests, workload.parse_range(args.input_len_range),
                                        workload.parse_range(args.output_len_range), args.seed)]
    return [workload.latency(int(b), args.input_len, args.output_len) for b in args.batch.split(",")]


def cmd_bench_url(args) -> int:
    """N concurrent streaming clients against the OpenAI-compatible server at --url (bench/serving.py)."""
    import asyncio

    from .bench.serving import ClientRequest, print_summary, run_clients, summarize, word_prompts

    if args.concurrency < 1 or args.input_len < 1 or args.output_len < 1:
        raise BenchArgumentError("--concurrency, --input-len and --output-len must be >= 1")
    n = args.num_requests if args.num_requests is not None else 4 * args.concurrency
    requests = [ClientRequest(p, args.output_len) for p in word_prompts(n, args.input_len, args.seed)]
    results, wall = asyncio.run(run_clients(args.url, args.served_model_name, requests, args.concurrency,
                                            args.api_key))
    summary = {"url": args.url, "concurrency": args.concurrency, "input_words": args.input_len,
               "output_len": args.output_len, **summarize(results, wall)}
    print_summary(args.url, summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


def cmd_bench(args) -> int:
    if args.url:
        return cmd_bench_url(args)
    from .bench.report import print_report
    from .bench.suite import BenchConfig, run_bench
    from .cli import _split_overrides, check_at_least

    _split_overrides(args)
    try:
        workloads = _workloads(args)
    except ValueError as e:
        raise BenchArgumentError(str(e)) from None
    check_at_least(BenchArgumentError, {"--warmup": (args.warmup, 0), "--repeats": (args.repeats, 1),
                                        "--profile": (args.profile, 0), "--profile-prefill": (args.profile_prefill, 0),
                                        "--max-batch-size": (args.max_batch_size, 1),
                                        "--max-num-tokens": (args.max_num_tokens, 1)})
    if args.peers_only and not args.baseline:
        raise BenchArgumentError("--peers-only measures the --baseline peers alone: name at least one")
    cfg = BenchConfig(model=args.model, workloads=workloads, recipe=args.recipe, overrides=args.overrides,
                      baselines=args.baseline, cuda_graphs=args.cuda_graphs, warmup=args.warmup,
                      repeats=args.repeats, max_batch_size=args.max_batch_size,
                      max_num_tokens=args.max_num_tokens, seed=args.seed, profile_steps=args.profile,
                      profile_prefill=args.profile_prefill,
                      peers_only=args.peers_only,
                      prefix_caching="off" if args.enable_prefix_caching is False else "auto")
    result = run_bench(cfg)
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\n  results written to {args.json}")
    return 0


def register(subparsers) -> None:
    """Add `bench` to autodeploy's subcommands."""
    from .bench.hf import BASELINES
    from .cli import _add_model_args
    from .cli_generate import add_prefix_caching_arg

    p = subparsers.add_parser(
        "bench", help="latency / throughput benchmark with HF peers and the bandwidth ceiling",
        description="Benchmark MODEL through the in-flight runtime. Latency mode (default): --batch B requests of "
                    "--input-len random tokens, exactly --output-len new tokens each. Throughput mode: "
                    "--num-requests N with random lengths, or --lengths-file. Reports TTFT, inter-token latency "
                    "p50/p90/p99, output tok/s, and the batch-1 decode ceiling (weight bytes / measured copy "
                    "bandwidth); --baseline measures HF transformers in the same run.")
    _add_model_args(p)
    lat = p.add_argument_group("latency mode")
    lat.add_argument("--batch", default="1", help="batch size, or several (1,64): one workload each (default 1)")
    lat.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    lat.add_argument("--output-len", type=int, default=128, help="new tokens per request (default 128)")
    thr = p.add_argument_group("offline-throughput mode")
    thr.add_argument("--num-requests", type=int, default=None, help="N requests with random lengths")
    thr.add_argument("--input-len-range", default="32,512", help="a,b: prompt lengths drawn uniformly (default 32,512)")
    thr.add_argument("--output-len-range", default="32,256", help="c,d: output lengths (default 32,256)")
    thr.add_argument("--lengths-file", default=None, help='JSON list of [input_len, output_len] pairs')
    pre = p.add_argument_group("shared-prefix mode")
    pre.add_argument("--shared-prefix", type=int, default=None, metavar="P",
                     help="--num-requests N (default 8) requests that share a P-token prefix, seen before they "
                          "arrive, then --input-len tokens each; measured with prefix caching on and off")
    add_prefix_caching_arg(p)
    p.add_argument("--baseline", action="append", default=[], choices=BASELINES,
                   help="also measure HF transformers eager (hf) or static cache + torch.compile (hf-compile)")
    p.add_argument("--peers-only", action="store_true",
                   help="measure only the --baseline peers, not autodeploy (same workload and seed: for a peer too "
                        "slow to share one device call, e.g. HF eager on a 512-request throughput workload)")
    p.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="on",
                   help="steps through CUDA graphs (CUDA only; both = measure with and without)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per runner and workload (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="engine sequences in flight (default: the largest --batch, at least the recipe's runtime.max_batch_size, 64)")
    p.add_argument("--max-num-tokens", type=int, default=None, help="engine tokens per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and lengths, and of the HF peer's random weights")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="torch.profiler over STEPS decode steps per latency workload (top kernels in the JSON)")
    p.add_argument("--profile-prefill", type=int, default=0, metavar="PASSES",
                   help="torch.profiler over PASSES runs of each latency workload's prompts alone (one new token "
                        "each): the prefill's kernels per pass")
    p.add_argument("--json", default=None, help="write all results as JSON to this path")
    srv = p.add_argument_group("serving mode (--url): N concurrent streaming clients against any OpenAI-compatible "
                               "server; --num-requests requests (default 4 x concurrency) of --input-len random "
                               "words and --output-len tokens")
    srv.add_argument("--url", default=None, help="the server's base URL, e.g. http://127.0.0.1:8000")
    srv.add_argument("--concurrency", type=int, default=8, help="streaming clients at once (default 8)")
    srv.add_argument("--served-model-name", default=None, help="the model field of the requests (default: none)")
    srv.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.set_defaults(func=cmd_bench)
