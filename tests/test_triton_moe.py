"""The Triton MoE backends (kernels/triton_moe.py) against `autodeploy::moe`'s and `fp8_moe`'s references: the sync-free sort of
(token, slot) pairs into per-expert tiles, the grouped GEMMs in the interpreter (odd widths, biases, unused
experts, one expert taking every token, top-k 1 / 2 / 4, bf16 and fp16; fresh outputs poisoned with NaN), the
float32 fallback, a tiny Qwen3-MoE through `select_backends` (bf16, logits of the reference backend), and on a GPU
Qwen3-30B-A3B's expert shapes and a CUDA graph replayed on new routing."""

from __future__ import annotations

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels import triton_moe
from autodeploy.optimizer import optimize_model

ops = torch.ops.autodeploy


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh tensors full of NaN (integer ones of -12345): whatever a kernel leaves unwritten shows."""
    empty = torch.empty

    def filled(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -12345)

    monkeypatch.setattr(torch, "empty", filled)


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [(1, 8, 64, 16), (37, 2, 8, 16), (300, 4, 8, 64), (5, 1, 3, 16),
                                                          (64, 8, 128, 16)])
@pytest.mark.parametrize("one_program", [True, False])
def test_expert_tiles_hold_every_pair_once_in_its_experts_tiles(tokens, top_k, experts, block_m, one_program,
                                                                 monkeypatch, poisoned):
    """Both forms (one Triton program for decode's few pairs, torch's sort past them): every pair once, in its
    expert's tiles, in order; padding rows = P; unused tiles marked E."""
    if not one_program:
        monkeypatch.setattr(triton_moe, "ONE_PROGRAM_PAIRS", 0)
    monkeypatch.setattr(triton_moe, "ONE_HOT_ELEMENTS", 512)  # several chunks of pairs even here
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, top_k), generator=g, dtype=torch.int32)
    ids[: tokens // 2, 0] = experts - 1  # one busy expert; others may see nobody
    rows, tile_expert = triton_moe.expert_tiles(ids, experts, block_m)
    pairs = tokens * top_k
    assert tile_expert.numel() == pairs // block_m + min(pairs, experts) and rows.numel() == tile_expert.numel() * block_m
    real = rows[rows < pairs]
    assert sorted(real.tolist()) == list(range(pairs)) and (rows[rows >= pairs] == pairs).all()
    flat = ids.reshape(-1)
    for tile, expert in enumerate(tile_expert.tolist()):
        in_tile = rows[tile * block_m:(tile + 1) * block_m]
        in_tile = in_tile[in_tile < pairs]
        if expert == experts:
            assert in_tile.numel() == 0
        else:
            assert (flat[in_tile] == expert).all() and in_tile.tolist() == sorted(in_tile.tolist())  # stable
    used = tile_expert[tile_expert < experts]
    assert used.tolist() == sorted(used.tolist())


def _inputs(tokens, top_k, experts, hidden, inner, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 0] += 3.0  # expert 0 busy, the last ones rarely used
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    w_gate_up = (torch.randn(experts, 2 * inner, hidden, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inner, generator=g) / inner**0.5).to(dtype)
    b = ((torch.randn(experts, 2 * inner, generator=g) / 4).to(dtype), (torch.randn(experts, hidden, generator=g) / 4).to(dtype)) \
        if bias else (None, None)
    return x, ids, weights.to(dtype), w_gate_up, w_down, *b


CASES = [(1, 2, 4, 64, 32, torch.bfloat16, False, "silu"), (7, 4, 6, 80, 48, torch.float16, True, "gelu"),
         (37, 1, 5, 64, 96, torch.bfloat16, True, "silu"), (70, 2, 3, 48, 16, torch.bfloat16, False, "relu")]


@pytest.mark.parametrize("tokens,top_k,experts,hidden,inner,dtype,bias,activation", CASES)
def test_matches_reference(tokens, top_k, experts, hidden, inner, dtype, bias, activation, poisoned):
    args = _inputs(tokens, top_k, experts, hidden, inner, dtype, bias, tokens)
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down = args
    want = ops.moe(x, ids, weights, w_gate_up, w_down, activation, b_gate_up, b_down)
    got = triton_moe.moe(x, ids, weights, w_gate_up, w_down, activation, b_gate_up, b_down)
    assert got.dtype == dtype and got.shape == x.shape and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_transposed_expert_weights_and_leading_dims():
    """Expert banks the graph transposes (stored [E, in, out]) are read in their strides; x keeps its shape."""
    x, ids, weights, w_gate_up, w_down, _, _ = _inputs(6, 2, 4, 64, 32, torch.bfloat16, False, 3)
    w_gate_up_t, w_down_t = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2), w_down.transpose(1, 2).contiguous().transpose(1, 2)
    want = ops.moe(x.view(2, 3, 64), ids.view(2, 3, 2), weights.view(2, 3, 2), w_gate_up, w_down, "silu")
    got = triton_moe.moe(x.view(2, 3, 64), ids.view(2, 3, 2), weights.view(2, 3, 2), w_gate_up_t, w_down_t, "silu")
    assert got.shape == (2, 3, 64)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("op,overrides", [("moe", []), ("fp8_moe", ["quantization.algo=fp8"]),
                                           ("fp8_moe", ["quantization.algo=fp8", "quantization.weight_block_size=16",
                                                        "quantization.act_group_size=16"])])
def test_qwen3_moe_through_the_backend(tmp_path, op, overrides):
    from transformers import Qwen3MoeConfig

    from conftest import save_tiny_checkpoint
    from runtime_helpers import NO_CACHE

    save_tiny_checkpoint(tmp_path, Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, head_dim=16,
        max_position_embeddings=128))
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    for backend in ("torch", "triton"):
        opt = optimize_model(tmp_path, overrides=["model.device=cpu", "model.dtype=bfloat16", NO_CACHE, *overrides,
                                                  f"transforms.select_backends.backends.{op}={backend}"], progress=False)
        target = getattr(ops, op if backend == "torch" else f"{op}_triton").default
        assert sum(n.target == target for n in opt.gm.graph.nodes) == 2
        logits[backend] = opt.logits(ids).float()
    want = logits["torch"]
    torch.testing.assert_close(logits["triton"], want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_float32_keeps_the_reference():
    args = _inputs(5, 2, 4, 64, 32, torch.float32, True, 5)
    assert torch.equal(triton_moe.moe(*args[:5], "silu", *args[5:]), ops.moe(*args[:5], "silu", *args[5:]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 7, 64, 300, 2048])
def test_matches_reference_on_gpu(tokens):
    """Qwen3-30B-A3B's expert shapes (128 experts of 2,048 x 768, top 8), bf16."""
    args = [t.cuda() if t is not None else None for t in _inputs(tokens, 8, 128, 2048, 768, torch.bfloat16, False, tokens)]
    x, ids, weights, w_gate_up, w_down, _, _ = args
    want = ops.moe(x, ids, weights, w_gate_up, w_down, "silu")
    got = torch.ops.autodeploy.moe_triton(x, ids, weights, w_gate_up, w_down, "silu")
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_new_routing():
    """Nothing syncs with the host: captured once, replayed on other tokens and routes, the reference's result."""
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down = (
        t.cuda() for t in _inputs(16, 4, 32, 256, 128, torch.bfloat16, True, 0))
    static = [x.clone(), ids.clone(), weights.clone()]
    triton_moe.moe(*static, w_gate_up, w_down, "silu", b_gate_up, b_down)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_moe.moe(*static, w_gate_up, w_down, "silu", b_gate_up, b_down)
    for seed in (1, 2):
        new = _inputs(16, 4, 32, 256, 128, torch.bfloat16, True, seed)
        for buffer, value in zip(static, new[:3]):
            buffer.copy_(value)
        graph.replay()
        want = ops.moe(*static, w_gate_up, w_down, "silu", b_gate_up, b_down)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def _fp8_experts(w: torch.Tensor, scheme: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> e4m3 codes and scales per expert ([E]), per channel ([E, N]) or per block ([E, N/B, K/B])."""
    from autodeploy.kernels.quant_format import quantize_fp8, quantize_fp8_blocks

    parts = [quantize_fp8_blocks(e, block) if scheme == "block" else quantize_fp8(e, scheme == "channel") for e in w]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


FP8_CASES = [(1, 2, 4, 64, 32, "channel", 0, False), (9, 2, 5, 80, 48, "expert", 0, True),
             (37, 4, 6, 64, 32, "block", 16, False), (70, 2, 3, 80, 48, "block", 32, True)]


@pytest.mark.parametrize("tokens,top_k,experts,hidden,inner,scheme,block,bias", FP8_CASES)
def test_fp8_experts_match_reference(tokens, top_k, experts, hidden, inner, scheme, block, bias, poisoned):
    """fp8_moe_triton: per-expert, per-channel and block weight scales (blocks of 32 over 80 / 48-wide experts: short
    last blocks along N and K), activations per token or group, biases; against fp8_moe's float32 reference."""
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down = _inputs(tokens, top_k, experts, hidden, inner,
                                                                    torch.bfloat16, bias, tokens)
    (q_gu, s_gu), (q_d, s_d) = _fp8_experts(w_gate_up.float(), scheme, block), _fp8_experts(w_down.float(), scheme, block)
    want = ops.fp8_moe(x, ids, weights, q_gu, s_gu, q_d, s_d, "silu", b_gate_up, b_down, weight_block=block)
    got = triton_moe.fp8_moe(x, ids, weights, q_gu, s_gu, q_d, s_d, "silu", b_gate_up, b_down, weight_block=block)
    assert got.dtype == x.dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_fp8_static_input_scales_keep_the_reference():
    x, ids, weights, w_gate_up, w_down, _, _ = _inputs(5, 2, 4, 64, 32, torch.bfloat16, False, 2)
    (q_gu, s_gu), (q_d, s_d) = _fp8_experts(w_gate_up.float(), "channel", 0), _fp8_experts(w_down.float(), "channel", 0)
    statics = (torch.full((4,), 0.02), torch.full((4,), 0.05))
    assert torch.equal(triton_moe.fp8_moe(x, ids, weights, q_gu, s_gu, q_d, s_d, "silu", None, None, *statics),
                       ops.fp8_moe(x, ids, weights, q_gu, s_gu, q_d, s_d, "silu", None, None, *statics))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme,block", [("channel", 0), ("block", 128)])
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_fp8_experts_on_gpu(tokens, scheme, block):
    """Qwen3-30B-A3B's expert shapes in FP8 (per channel, or its FP8 checkpoint's 128 x 128 blocks)."""
    x, ids, weights, w_gate_up, w_down, _, _ = _inputs(tokens, 8, 128, 2048, 768, torch.bfloat16, False, tokens)
    (q_gu, s_gu), (q_d, s_d) = _fp8_experts(w_gate_up.float(), scheme, block), _fp8_experts(w_down.float(), scheme, block)
    args = [t.cuda() for t in (x, ids, weights, q_gu, s_gu, q_d, s_d)]
    want = ops.fp8_moe(*args, "silu", weight_block=block)
    got = torch.ops.autodeploy.fp8_moe_triton(*args, "silu", weight_block=block)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
