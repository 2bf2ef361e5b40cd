"""Decode attention on the GPU, Llama-3.1-8B shape (32 heads / 8 KV heads, d 128, bf16, 32-token
pages): the general paged kernel vs the decode kernel, and index_copy_ vs the Triton KV write.
Median of triton.testing.do_bench (CUDA events), per layer call."""

import torch
import triton

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.cached_attention import write_kv_cache as index_copy_write
from autodeploy.kernels.triton_cached_attention import paged_attention
from autodeploy.kernels.triton_decode_attention import decode_attention, write_kv_cache

dev, dt, page = "cuda", torch.bfloat16, 32


def decode_inputs(batch: int, ctx: int):
    """A paged cache of `batch` sequences of `ctx` tokens (shuffled blocks) and one query per sequence."""
    blocks = -(-ctx // page)
    kc = torch.randn(batch * blocks + 1, page, 8, 128, device=dev, dtype=dt)
    tables = torch.randperm(batch * blocks, device=dev).to(torch.int32).view(batch, blocks)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    return torch.randn(1, 32, batch, 128, device=dev, dtype=dt), kc, torch.randn_like(kc), tables, lens


print(f"{'batch':>5} {'ctx':>5} {'paged us':>9} {'decode us':>9} {'idxcopy us':>10} {'kvwrite us':>10} {'rel err':>8}")
for batch, ctx in [(1, 256), (1, 2048), (64, 256), (64, 1024)]:
    q, kc, vc, tables, lens = decode_inputs(batch, ctx)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    k = torch.randn(1, 8, batch, 128, device=dev, dtype=dt)
    slots = (tables[:, -1].long() * page + (ctx - 1) % page)
    a = paged_attention(q, kc, vc, cu, lens, tables, 128 ** -0.5)
    b = decode_attention(q, kc, vc, lens, tables, 128 ** -0.5)
    err = ((a.float() - b.float()).norm() / a.float().norm()).item()
    t = [triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3 for f in (
        lambda: paged_attention(q, kc, vc, cu, lens, tables, 128 ** -0.5),
        lambda: decode_attention(q, kc, vc, lens, tables, 128 ** -0.5),
        lambda: index_copy_write(k, k, kc, vc, slots),
        lambda: write_kv_cache(k, k, kc, vc, slots))]
    print(f"{batch:>5} {ctx:>5} {t[0]:>9.1f} {t[1]:>9.1f} {t[2]:>10.1f} {t[3]:>10.1f} {err:>8.1e}")

# Sweep of the decode kernel's knobs, timed inside a CUDA graph (device time, no launch cost):
# the shapes of a decode step at batch 1 / 64 and contexts up to a 4096-token prompt.
print("\nsweep (do_bench_cudagraph, us per layer call; default splits: 32 at batch 1, 1 at batch 64)")
print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'block_n':>7} {'warps':>5} {'stages':>6} {'us':>7}")
for batch, ctx in [(1, 256), (1, 4224), (64, 192), (64, 1024)]:
    q, kc, vc, tables, lens = decode_inputs(batch, ctx)
    ref = decode_attention(q, kc, vc, lens, tables, 128 ** -0.5).float()
    for splits in ((8, 16, 32) if batch == 1 else (1, 2)):
        for block_n in (32, 64):
            for warps in (2, 4):
                for stages in (1, 2, 3):
                    def call():
                        return decode_attention(q, kc, vc, lens, tables, 128 ** -0.5, num_splits=splits,
                                                block_n=block_n, num_warps=warps, num_stages=stages)
                    err = ((call().float() - ref).norm() / ref.norm()).item()
                    us = triton.testing.do_bench_cudagraph(call, rep=50) * 1e3
                    print(f"{batch:>5} {ctx:>5} {splits:>6} {block_n:>7} {warps:>5} {stages:>6} {us:>7.1f}"
                          + ("" if err < 1e-2 else f"  WRONG rel err {err:.1e}"))
