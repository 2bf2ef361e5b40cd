"""moe_triton on Qwen3-30B-A3B's experts (128 of 2,048 x 768, top 8, bf16) at 1 and 64 tokens, us per layer: the
sort of the (token, slot) pairs into expert tiles (one Triton program against torch's sort) and the whole op for a
sweep of the grouped GEMM's knobs (BLOCK_N, BLOCK_K, warps, stages), each checked against the reference first.
Timed as a CUDA graph over 8 layers' weight copies (9.7 GB, colder than L2). H200 figures: BENCHMARKS.md session 21.
Usage (repository root, a CUDA device): python3 benchmarks/moe_kernel_bench.py"""
import itertools

import torch

import autodeploy.kernels  # noqa: F401  (registers the ops)
from autodeploy.kernels import triton_moe as tm

EXPERTS, HIDDEN, INNER, TOP_K, LAYERS = 128, 2048, 768, 8, 8
KNOBS = list(itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4)))


def timed(fn, reps: int = 20) -> float:
    """us per call of fn's graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    w_gate_up = [torch.randn(EXPERTS, 2 * INNER, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5
                 for _ in range(LAYERS)]
    w_down = [torch.randn(EXPERTS, HIDDEN, INNER, device="cuda", dtype=torch.bfloat16) / INNER**0.5
              for _ in range(LAYERS)]
    defaults = (tm.BLOCK_N, tm.BLOCK_K, tm.NUM_WARPS, tm.NUM_STAGES, tm.ONE_PROGRAM_PAIRS)
    for tokens in (1, 64):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        weights, ids = torch.randn(tokens, EXPERTS, device="cuda").softmax(-1).topk(TOP_K, -1)
        weights = weights.to(torch.bfloat16)
        ref = torch.ops.autodeploy.moe(x, ids, weights, w_gate_up[0], w_down[0], "silu").float()
        block_m = 16 if tokens * TOP_K <= tm.FEW_PAIRS_PER_EXPERT * EXPERTS else 64
        for label, pairs in (("one program", defaults[4]), ("torch sort", 0)):
            tm.ONE_PROGRAM_PAIRS = pairs
            us = timed(lambda: [tm.expert_tiles(ids, EXPERTS, block_m) for _ in range(LAYERS)]) / LAYERS
            print(f"{tokens} tokens: expert_tiles ({label}) {us:.1f} us", flush=True)
        tm.ONE_PROGRAM_PAIRS = defaults[4]
        results = []
        for knobs in KNOBS:
            tm.BLOCK_N, tm.BLOCK_K, tm.NUM_WARPS, tm.NUM_STAGES = knobs
            try:
                got = tm.moe(x, ids, weights, w_gate_up[0], w_down[0], "silu").float()
                if not (got - ref).abs().max() <= 2e-2 * ref.abs().max():
                    print(f"  {knobs}: WRONG", flush=True)
                    continue
                us = timed(lambda: [tm.moe(x, ids, weights, w_gate_up[i], w_down[i], "silu")
                                    for i in range(LAYERS)]) / LAYERS
                results.append((us, knobs))
            except Exception as e:  # out of shared memory for a large tile
                print(f"  {knobs}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
        results.sort()
        read = len(ids.unique()) * 3 * HIDDEN * INNER * 2
        print(f"{tokens} tokens: moe per layer, best " + ", ".join(f"{us:.1f} us {k}" for us, k in results[:6])
              + f"; now {dict((k, us) for us, k in results).get(defaults[:4], float('nan')):.1f} us {defaults[:4]};"
              f" routed weights {read / 1e6:.1f} MB", flush=True)
        tm.BLOCK_N, tm.BLOCK_K, tm.NUM_WARPS, tm.NUM_STAGES = defaults[:4]


if __name__ == "__main__":
    main()
