"""Prefill attention over the paged cache on the GPU, Llama-3.1-8B heads (32 query / 8 KV heads, d 128, bf16,
32-token pages in shuffled blocks): the Triton paged kernel (kernels/triton_cached_attention.py) against torch SDPA
(flash, causal, on contiguous K/V holding the same values), ms per layer call and TFLOP/s of the causal half.
--knobs: the kernel's (BLOCK_M, BLOCK_N, warps, stages, query heads per tile) sweep, best six per case.
Usage: python3 benchmarks/prefill_attention_bench.py [--knobs] [SEQSxTOKENS,...]   (default 1x4096,4x1024,16x128,1x512)
"""

import sys

import torch
import torch.nn.functional as F
import triton

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.triton_cached_attention import paged_attention

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 32
KNOBS = [(bm, bn, w, st, pack) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for st in (2, 3)
         for pack in (1, 4)]


def prompts(seqs: int, tokens: int):
    """`seqs` prompts of `tokens` tokens each in the packed layout, their K/V already in a paged cache; SDPA's
    contiguous copies of the same K/V."""
    torch.manual_seed(0)
    pages = -(-tokens // PAGE)
    k_cache = torch.randn(seqs * pages + 3, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(k_cache.shape[0], device="cuda")[: seqs * pages].to(torch.int32).view(seqs, pages)
    q = torch.randn(1, seqs * tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cu = torch.arange(0, seqs * tokens + 1, tokens, device="cuda", dtype=torch.int32)
    lens = torch.full((seqs,), tokens, device="cuda", dtype=torch.int32)
    keys = k_cache[tables.long()].flatten(1, 2)[:, :tokens].transpose(1, 2)  # [seqs, KV_HEADS, tokens, d]
    values = v_cache[tables.long()].flatten(1, 2)[:, :tokens].transpose(1, 2)
    return (q, k_cache, v_cache, cu, lens, tables), keys, values


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    specs = (args[0] if args else "1x4096,4x1024,16x128,1x512").split(",")
    cases = [tuple(int(v) for v in spec.split("x")) for spec in specs]
    scale = HEAD_DIM ** -0.5
    for seqs, tokens in cases:
        inputs, keys, values = prompts(seqs, tokens)
        q_seqs = inputs[0][0].view(HEADS, seqs, tokens, HEAD_DIM).transpose(0, 1)
        sdpa = lambda: F.scaled_dot_product_attention(q_seqs, keys, values, is_causal=True, scale=scale,
                                                      enable_gqa=True)
        want = sdpa().transpose(0, 1).reshape(1, HEADS, seqs * tokens, HEAD_DIM).float()
        flops = seqs * 4 * HEADS * HEAD_DIM * tokens * tokens / 2
        runs = {"torch SDPA (contiguous K/V)": sdpa, "paged kernel (default)": lambda: paged_attention(*inputs, scale)}
        if "--knobs" in sys.argv:
            for kn in KNOBS:
                runs[f"paged {kn}"] = lambda kn=kn: paged_attention(*inputs, scale, knobs=kn[:4], pack=kn[4])
        timed = []
        for name, run in runs.items():
            err = 0.0 if run is sdpa else (run().float() - want).abs().max().item()
            if not err < 3e-2:
                print(f"  {name}: WRONG, max error {err:.3g}")
                continue
            timed.append((triton.testing.do_bench(run, rep=50), name))
        print(f"{seqs} x {tokens} tokens")
        shown = timed[:2] + sorted(timed[2:])[:6]
        for ms, name in shown:
            print(f"  {name:34s} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
