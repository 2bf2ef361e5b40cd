"""Programmatic dependent launch (kernels/triton_pdl.py) on a Hopper GPU: a decode layer's chain of Triton
kernels, each reading what the one before it wrote, gives bit-identical results with and without PDL,
eagerly and replayed from a CUDA graph with fresh inputs between replays (a missing wait would let a
kernel read its input before the previous kernel wrote it)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm_90+")]

HIDDEN, INTER, N_HEADS, N_KV, HEAD_DIM, PAGE, CTX = 512, 1408, 8, 2, 64, 16, 37


def _layer(x, p, cache):
    """One Llama-style decode step of one token through the Triton kernels, ending in the argmax."""
    from autodeploy.kernels.triton_argmax import argmax_rows
    from autodeploy.kernels.triton_decode_attention import decode_attention, write_kv_cache
    from autodeploy.kernels.triton_gated_act import gated_act
    from autodeploy.kernels.triton_linear import skinny_linear
    from autodeploy.kernels.triton_rms_norm import fused_add_rms_norm, rms_norm
    from autodeploy.kernels.triton_rope import rope

    k_cache, v_cache, seq_lens, tables, slots = cache
    h = rms_norm(x, p["norm1"], 1e-5)
    qkv = skinny_linear(h, p["qkv"])
    q, k, v = qkv.split([N_HEADS * HEAD_DIM, N_KV * HEAD_DIM, N_KV * HEAD_DIM], dim=-1)
    q, k, v = (t.view(1, 1, -1, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
    q, k = rope(q, p["cos"], p["sin"]), rope(k, p["cos"], p["sin"])
    write_kv_cache(k, v, k_cache, v_cache, slots)
    attn = decode_attention(q, k_cache, v_cache, seq_lens, tables, HEAD_DIM ** -0.5)
    o = skinny_linear(attn.transpose(1, 2).reshape(1, -1), p["o"])
    h, added = fused_add_rms_norm(o, x, p["norm2"], 1e-5)
    gate, up = skinny_linear(h, p["gate_up"]).chunk(2, dim=-1)
    out = skinny_linear(gated_act(gate, up, "silu"), p["down"]) + added
    return out, argmax_rows(skinny_linear(out, p["lm_head"]))


def _params(gen):
    def w(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).cuda().bfloat16()

    angles = torch.rand(1, 1, 1, HEAD_DIM // 2, generator=gen) * 6.28
    return {"norm1": w(HIDDEN) + 1, "norm2": w(HIDDEN) + 1, "qkv": w((N_HEADS + 2 * N_KV) * HEAD_DIM, HIDDEN),
            "o": w(HIDDEN, N_HEADS * HEAD_DIM), "gate_up": w(2 * INTER, HIDDEN), "down": w(HIDDEN, INTER),
            "lm_head": w(5003, HIDDEN),
            "cos": torch.cat([angles.cos()] * 2, -1).cuda().bfloat16(),
            "sin": torch.cat([angles.sin()] * 2, -1).cuda().bfloat16()}


def _cache(gen):
    blocks = -(-CTX // PAGE)
    k_cache = torch.randn(blocks + 1, PAGE, N_KV, HEAD_DIM, generator=gen).cuda().bfloat16()
    tables = torch.randperm(blocks + 1, generator=gen)[:blocks].cuda().int()[None]
    slot = int(tables[0, (CTX - 1) // PAGE]) * PAGE + (CTX - 1) % PAGE
    return (k_cache, k_cache.clone(), torch.tensor([CTX], device="cuda", dtype=torch.int32), tables,
            torch.tensor([slot], device="cuda"))


def _run(pdl: bool, monkeypatch, inputs, params, cache_seed):
    """Outputs of `_layer` for each input: eagerly, then replayed from one captured graph."""
    monkeypatch.setenv("AUTODEPLOY_PDL", "1" if pdl else "0")
    cache = _cache(torch.Generator().manual_seed(cache_seed))
    eager = [_layer(x, params, cache) for x in inputs]
    static_x = inputs[0].clone()
    _layer(static_x, params, cache)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _layer(static_x, params, cache)
    replayed = []
    for x in inputs:
        static_x.copy_(x)
        graph.replay()
        replayed.append(tuple(t.clone() for t in static_out))
    torch.cuda.synchronize()
    return eager, replayed


def test_pdl_chain_is_bit_identical_eager_and_in_graph(monkeypatch):
    from autodeploy.kernels.triton_pdl import pdl_launch

    gen = torch.Generator().manual_seed(0)
    params = _params(gen)
    inputs = [torch.randn(1, HIDDEN, generator=gen).cuda().bfloat16() for _ in range(4)]
    monkeypatch.setenv("AUTODEPLOY_PDL", "1")
    assert pdl_launch(torch.device("cuda")).get("launch_pdl")
    want_eager, want_graph = _run(False, monkeypatch, inputs, params, cache_seed=1)
    got_eager, got_graph = _run(True, monkeypatch, inputs, params, cache_seed=1)
    for want, got in zip(want_eager + want_graph, got_eager + got_graph):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(want_eager, want_graph))
