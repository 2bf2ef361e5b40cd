"""Greedy tokens of `LLM(model, tensor_parallel_size=N)` against N = 1 on the same weights (issue 15).

Usage: python benchmarks/tp_correctness.py MODEL --tp 3 [--prompts 8] [--new-tokens 64] [--top-k 5] [key=value ...]
Both sides decode the same random-token prompts greedily (EOS ignored) with their top-k log-probs;
where the two sequences first part, each side's token must be in the other's top-k (bf16 can tie).
Exit status 1 when that fails. A model folder with weights is needed (random init differs per N).
"""

from __future__ import annotations

import argparse
import random
import sys

from autodeploy import LLM, SamplingParams


def decode(model: str, tp: int, prompts: list[list[int]], args, overrides: list[str]):
    llm = LLM(model, overrides=overrides, tensor_parallel_size=tp, max_batch_size=len(prompts))
    try:
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, logprobs=args.top_k)
        return [(o.token_ids, o.logprobs) for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=5)
    args, overrides = p.parse_known_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 20000) for _ in range(rng.randrange(8, 48))] for _ in range(args.prompts)]
    one = decode(args.model, 1, prompts, args, overrides)
    many = decode(args.model, args.tp, prompts, args, overrides)
    failures = 0
    for i, ((a, a_lp), (b, b_lp)) in enumerate(zip(one, many)):
        part = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        ok = part is None or (b[part] in a_lp[part] and a[part] in b_lp[part])
        failures += not ok
        where = "identical" if part is None else f"first part at token {part} ({'within' if ok else 'NOT in'} top-{args.top_k})"
        print(f"prompt {i}: TP 1 vs TP {args.tp}: {where}")
    print(f"{len(prompts) - failures}/{len(prompts)} prompts pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
