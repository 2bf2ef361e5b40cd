"""Decode speed of `LLM(model, tensor_parallel_size=N)` for several N in one run (issue 15).

Usage: python benchmarks/tp_bench.py MODEL --tp 1,2,4 [--batch 1,64] [--input-len 128] [--output-len 128]
       [--vocab-parallel false,true] [--config-only] [--repeats 2] [--json out.json] [key=value ...]
Each N builds its own LLM (N - 1 workers), times the same random-token workloads through the engine
(the in-flight runtime as users run it, CUDA graphs on CUDA) and stops its workers before the next N.
Every N > 1 runs once per `--vocab-parallel` choice (embedding / LM head replicated or split by
vocabulary rows): the measurement that decides `parallel.vocab_parallel: auto`.
Reported per N and batch: output tok/s, inter-token latency, the speed-up over the first N, time
from LLM(...) to ready, and each rank's weight bytes (rank 0's sharding report; ranks are symmetric).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from autodeploy import LLM
from autodeploy.bench import ours
from autodeploy.graph_utils import weight_bytes
from autodeploy.bench.metrics import summarize


def bench_one(model: str, tp: int, vocab_parallel: str, args, overrides: list[str]) -> dict:
    start = time.perf_counter()
    llm = LLM(model, overrides=[*overrides, f"parallel.vocab_parallel={vocab_parallel}"], tensor_parallel_size=tp,
              max_batch_size=max(args.batch))
    result = {"start_s": time.perf_counter() - start, "by_batch": {}}
    report = next((r for r in llm.model.reports if r.name == "shard_tensor_parallel"), None)
    result["sharding"] = dict(report.matched) if report is not None else {}
    result["weight_bytes_rank0"] = weight_bytes(llm.model.gm)
    vocab = llm.model.source.config.get_text_config().vocab_size
    try:
        for batch in args.batch:
            rng = random.Random(batch)
            prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(batch)]
            lens = [args.output_len] * batch
            ours.run(llm.engine, prompts, lens)  # warm-up
            runs = [ours.run(llm.engine, prompts, lens) for _ in range(args.repeats)]
            result["by_batch"][batch] = summarize(runs)
    finally:
        llm.shutdown()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tp", default="1,2", help="tensor-parallel sizes, comma separated (default 1,2)")
    p.add_argument("--batch", default="1", help="batch sizes, comma separated (default 1)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--vocab-parallel", default="false,true",
                   help="embedding / LM head split by vocabulary for N > 1, comma separated (default false,true)")
    p.add_argument("--config-only", action="store_true", help="random weights from the config")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args()
    args.batch = [int(b) for b in args.batch.split(",")]
    overrides += ["model.config_only=true"] if args.config_only else []
    runs = [(tp, vocab) for tp in (int(t) for t in args.tp.split(","))
            for vocab in (args.vocab_parallel.split(",") if tp > 1 else ["false"])]
    results = {f"{tp}" + (" vocab" if vocab == "true" else ""): bench_one(args.model, tp, vocab, args, overrides)
               for tp, vocab in runs}
    first = next(iter(results.values()))
    for tp, r in results.items():
        for batch, m in r["by_batch"].items():
            speedup = m["output_tok_s"] / first["by_batch"][batch]["output_tok_s"]
            print(f"TP {tp:8s} batch {batch:3d}: {m['output_tok_s']:9.1f} tok/s  ITL {m['itl_ms']['mean']:7.2f} ms  "
                  f"x{speedup:.2f}  start {r['start_s']:.0f} s  "
                  f"weights/rank {r['weight_bytes_rank0'] / 1e9:.2f} GB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
