"""FP8 weights with one scale per block x block tile (`quantization.weight_block_size`, DeepSeek-V3 / Qwen3-FP8's
layout): the format, the references, the Triton dot applying the blocks per K step, and online quantization
end to end. Blocks are the activations' groups (the GEMM promotes per K group)."""

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.errors import QuantizationError
from autodeploy.kernels import triton_fp8_act_quant, triton_quant_fp8_linear
from autodeploy.kernels.quant_format import FP8_MAX, block_columns, dequantize_fp8, quantize_fp8_blocks
from autodeploy.optimizer import optimize_model
from autodeploy.quantization.settings import QuantizationSettings
from test_quant_triton import poisoned  # noqa: F401  (fixture: fresh outputs full of NaN)
from test_quantize_linear import NO_CACHE, PROMPT, TOLERANCE, llama_dir, llama_logits  # noqa: F401  (fixtures)

ops = torch.ops.autodeploy


def test_blocks_hold_their_amax_and_round_trip():
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    w[128:, 256:] = 0  # an all-zero (short) block keeps a finite scale
    q, scale = quantize_fp8_blocks(w, 128)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    assert torch.allclose(scale[0, 0], w[:128, :128].abs().max() / FP8_MAX)
    assert scale[1, 2] > 0 and q[128:, 256:].float().abs().max() == 0
    back = dequantize_fp8(q, scale, 128)
    step = block_columns(scale, 128, 200, 300)  # e4m3: half an ulp of 3 mantissa bits, or of the subnormals' 2**-9
    assert ((back - w).abs() <= w.abs() / 16 + step * 2.0**-10 + 1e-7).all()


def test_reference_multiplies_the_dequantized_blocks():
    torch.manual_seed(1)
    x, w = torch.randn(5, 300), torch.randn(72, 300)
    q, scale = quantize_fp8_blocks(w, 64)
    got = ops.fp8_linear(x, q, scale, None, None, "group", 64)
    qx, sx = ops.quantize_fp8_per_token(x, 64)
    want = (qx.float() * sx.repeat_interleave(64, -1)[:, :300]) @ dequantize_fp8(q, scale, 64).t()
    torch.testing.assert_close(got, want)


def test_block_scales_need_matching_activation_groups():
    q, scale = quantize_fp8_blocks(torch.randn(64, 256), 128)
    with pytest.raises(Exception, match="per-token-group"):  # the fake impl refuses it at export
        torch.library.opcheck(ops.fp8_linear.default, (torch.randn(2, 256), q, scale, None, None, "token", 128),
                              test_utils=("test_faketensor",))
    with pytest.raises(Exception, match="must be \\[1, 4\\] for blocks of 64"):
        torch.library.opcheck(ops.fp8_linear.default, (torch.randn(2, 256), q, scale, None, None, "group", 64),
                              test_utils=("test_faketensor",))
    with pytest.raises(QuantizationError, match="weight_block_size 128 needs act_quant group"):
        QuantizationSettings(algo="fp8", weight_block_size=128, act_quant="token")


# rows, N, K, block, swap, split_k, K tile: short blocks along N and K, two K steps per block, split K
DOTS = [(3, 200, 300, 64, True, 1, 64), (5, 128, 256, 128, False, 1, 64), (21, 72, 96, 32, False, 2, 32),
        (2, 40, 100, 128, True, 1, 128)]


@pytest.mark.parametrize("rows,n,k,block,swap,split_k,block_k", DOTS)
def test_dot_applies_the_blocks_per_k_step(rows, n, k, block, swap, split_k, block_k, poisoned):
    torch.manual_seed(rows + k)
    x, bias = torch.randn(rows, k), torch.randn(n)
    w, scale = quantize_fp8_blocks(torch.randn(n, k), block)
    q, sx = triton_fp8_act_quant.quantize_fp8_per_token(x, block)
    want = ops.fp8_linear_quantized_input(q, sx, w, scale, bias, torch.float32, block)
    got = triton_quant_fp8_linear.skinny_fp8_linear(q, w, scale, None, bias, block_n=16, block_k=block_k, swap=swap,
                                                    x_scale=sx, out_dtype=torch.float32, x_group=block, block_m=16,
                                                    split_k=split_k)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_backend_routes_block_weights(rows, poisoned):
    """One row (the GEMV), a few (the dot), past QUANTIZED_X_ROWS (the dot in tiles of rows)."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 256)
    w, scale = quantize_fp8_blocks(torch.randn(48, 256), 128)
    q, sx = triton_fp8_act_quant.quantize_fp8_per_token(x, 128)
    want = ops.fp8_linear_quantized_input(q, sx, w, scale, None, torch.float32, 128)
    got = triton_quant_fp8_linear.given_fp8_linear(q, sx, w, scale, None, torch.float32, 128)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


def test_online_block_weights_end_to_end(llama_dir, llama_logits):
    """The tiny Llama (hidden 64, MLP 128) in blocks of 32: every linear but lm_head, q/k/v and gate/up fused."""
    overrides = NO_CACHE + ["quantization.algo=fp8", "quantization.weight_block_size=32",
                            "quantization.act_group_size=32"]
    opt = optimize_model(llama_dir, overrides=overrides, progress=False)
    params = dict(opt.gm.named_parameters())
    assert params["model.model.layers.0.self_attn.q_k_v_proj.weight_scale"].shape == (4, 2)  # 64 + 32 + 32 rows
    assert params["model.model.layers.0.mlp.down_proj.weight_scale"].shape == (2, 4)
    ops_run = [str(n.target) for n in opt.gm.graph.nodes if n.op == "call_function"]
    assert ops_run.count("autodeploy.fp8_linear_quantized_input.default") == 8
    logits = opt.logits(PROMPT)
    err = (logits - llama_logits).abs().max() / llama_logits.abs().max()
    assert 0 < err < TOLERANCE["fp8"]


def test_a_shard_that_cuts_blocks_is_refused():
    """Online and checkpoint block weights alike (quantize_linear, and sharded_scheme before anything is read)."""
    from autodeploy.parallel.slices import ShardSlice
    from autodeploy.quantization.schemes import LinearScheme
    from autodeploy.parallel.quantized_slices import check_whole_blocks

    scheme = LinearScheme("fp8", act_quant="group", weight_block=128)
    check_whole_blocks(scheme, ShardSlice(0, ((128, 256),), size=300), "q_proj")
    check_whole_blocks(scheme, ShardSlice(0, ((256, 300),), size=300), "q_proj")  # the weight's short last block
    with pytest.raises(QuantizationError, match="cuts FP8 weight blocks of 128"):
        check_whole_blocks(scheme, ShardSlice(1, ((0, 150),), size=300), "o_proj")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64, 65, 300, 2048])
def test_compiled_routes_on_gpu(rows):
    """bf16 as decode and prefill run it: the GEMV (1 row), the dot (3, 5, 65), cuBLASLt's 1 x 128 GEMM on the blocks
    repeated (4, 64) and its 128 x 128 one on the blocks as stored (300, 2,048 rows: BLOCK_WEIGHT_ROWS); a short last
    block along N (N = 1,000) and K (K = 4,160: cuBLASLt takes only whole 128-column groups, so the dot)."""
    torch.manual_seed(rows)
    for n, k in ((1024, 4096), (1000, 4096), (1024, 4160)):
        w, scale = (t.cuda() for t in quantize_fp8_blocks(torch.randn(n, k) / k**0.5, 128))
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        q, sx = triton_fp8_act_quant.quantize_fp8_per_token(x, 128)
        want = ops.fp8_linear_quantized_input(q, sx, w, scale, None, torch.float32, 128)
        got = triton_quant_fp8_linear.fp8_linear_quantized_input(q, sx, w, scale, None, torch.bfloat16, 128)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
