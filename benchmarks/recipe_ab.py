"""A/B of recipe overrides in one process: each variant built once (same prompts, same seed), then its runtime
timed as `autodeploy bench` times it (one untimed pass, then the timed ones); a line of figures per variant and
workload. What session 20's override A/Bs ran (BENCHMARKS.md), e.g. the attention's quantizing epilogue on / off:

  python3 benchmarks/recipe_ab.py --model benchmarks/llama-3.1-8b on=quantization.algo=fp8 \\
      off=quantization.algo=fp8,transforms.fuse_attention_quant_fp8.enabled=false on2=quantization.algo=fp8

Variants are NAME=override,override (NAME= alone: the default recipe); --config-only weights unless --weights.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace

import torch

from autodeploy.bench import ours
from autodeploy.bench.metrics import summarize
from autodeploy.bench.workload import latency, random_prompts
from autodeploy.optimizer import optimize_model
from autodeploy.recipe import load_recipe


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=override,override (NAME= for none), not {text!r}")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", type=_variant, metavar="NAME=OVERRIDES")
    parser.add_argument("--model", default="benchmarks/llama-3.1-8b")
    parser.add_argument("--weights", action="store_true", help="the model's checkpoint instead of random weights")
    parser.add_argument("--batch", default="1,64", help="latency batches, comma-separated")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per workload (median reported)")
    args = parser.parse_args()
    workloads = [latency(int(b), args.input_len, args.output_len) for b in args.batch.split(",")]
    for name, overrides in args.variants:
        recipe = load_recipe(None, ([] if args.weights else ["model.config_only=true"]) + overrides)
        start = time.perf_counter()
        opt = optimize_model(args.model, recipe, progress=False)
        built = time.perf_counter() - start
        vocab = opt.source.config.get_text_config().vocab_size
        batch = max(len(w.requests) for w in workloads)
        engine = ours.make_engine(opt, replace(recipe.runtime, max_batch_size=max(batch, recipe.runtime.max_batch_size)))
        for workload in workloads:
            prompts, lens = random_prompts(workload, vocab), [r.output_len for r in workload.requests]
            ours.run(engine, prompts, lens)
            m = summarize([ours.run(engine, prompts, lens) for _ in range(args.repeats)])
            runs = ", ".join(f"{r:.1f}" for r in m["output_tok_s_all_runs"])
            print(f"{name:12s} {workload.name:28s} {m['output_tok_s']:10.1f} tok/s ({runs})  TTFT p50 "
                  f"{m['ttft_ms']['p50']:.1f} ms  ITL p50 / p99 {m['itl_ms']['p50']:.2f} / {m['itl_ms']['p99']:.2f} ms"
                  f"  (built in {built:.0f} s)", flush=True)
        del engine, opt
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
