"""fuse_fp8_act_quant: FP8 W8A8 linears read activations quantized once, in the RMSNorm where it feeds them.

The rewritten graph must give the unrewritten one's logits exactly (the ops compose to fp8_linear's
reference), and the Triton backends of the new ops must equal their references (interpreter, odd shapes)."""

import pytest
import torch
from autodeploy.kernels.quant_format import quantize_fp8
from autodeploy.optimizer import optimize_model

PROMPT = torch.tensor([[3, 17, 42, 9, 100, 7, 64, 5]])
FP8 = ["transforms.insert_kv_cache.enabled=false", "quantization.algo=fp8"]
ops = torch.ops.autodeploy


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir):
    return tiny_llama_dir


def _count(opt, op) -> int:
    return sum(n.op == "call_function" and n.target == op for n in opt.gm.graph.nodes)


def test_graph_quantizes_each_activation_once_and_in_the_norm(llama_dir):
    plain = optimize_model(llama_dir, overrides=FP8 + ["transforms.fuse_fp8_act_quant.enabled=false"], progress=False)
    fused = optimize_model(llama_dir, overrides=FP8, progress=False)
    linears = _count(plain, ops.fp8_linear.default)
    assert linears > 0 and _count(fused, ops.fp8_linear.default) == 0
    assert _count(fused, ops.fp8_linear_quantized_input.default) == linears
    report = next(r for r in fused.reports if r.name == "fuse_fp8_act_quant")
    # per layer: the input norm (fused with the previous layer's residual add, except in layer 0), the
    # attention output, the post-attention norm and the gated activation: 4 tensors, 3 of them normalized
    assert report.matched["activation_quantizations"] == 8
    assert report.matched["quantizations_in_rms_norm"] == _count(fused, ops.fused_add_rms_norm_quant_fp8.default) == 3
    assert torch.equal(fused.logits(PROMPT), plain.logits(PROMPT))


def test_other_activation_scales_are_left_alone(llama_dir):
    fused = optimize_model(llama_dir, overrides=FP8 + ["quantization.act_quant=tensor"], progress=False)
    assert _count(fused, ops.fp8_linear_quantized_input.default) == 0 and _count(fused, ops.fp8_linear.default) > 0


@pytest.mark.parametrize("rows,n,k", [(1, 40, 96), (3, 72, 200), (21, 64, 128)])
def test_triton_backends_equal_references(rows, n, k):
    from autodeploy.kernels import triton_fp8_act_quant, triton_quant_fp8_linear, triton_rms_norm

    torch.manual_seed(rows)
    x, residual = torch.randn(rows, k), torch.randn(rows, k)
    norm_weight = torch.rand(k) + 0.5
    weight, weight_scale = quantize_fp8(torch.randn(n, k), True)
    bias = torch.randn(n)

    q, scale = triton_fp8_act_quant.quantize_fp8_per_token(x)
    ref_q, ref_scale = ops.quantize_fp8_per_token(x)
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_scale)

    got = triton_quant_fp8_linear.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.float32)
    ref = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.float32)
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, ops.fp8_linear(x, weight, weight_scale, None, bias, "token"), rtol=1e-5, atol=1e-4)

    # The kernel's rsqrt and reduction order may move a normalized value by an ulp, and a value next to an e4m3
    # rounding boundary then lands one e4m3 step (at most 1/8 of it) away: allow that for a few elements.
    # (float32: the interpreter truncates to bf16 where GPUs round.) The residual sum is exact.
    (q, scale, added), (ref_q, ref_scale, ref_added) = (
        triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6),
        ops.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6))
    assert (q.dtype, scale.dtype, added.dtype) == (ref_q.dtype, ref_scale.dtype, ref_added.dtype)
    assert torch.equal(added, ref_added)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.float() * scale, ref_q.float() * ref_scale, rtol=0.13, atol=1e-3 * ref_scale.max().item())
    assert (q.float() != ref_q.float()).float().mean() < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 5, 17, 64, 100])
def test_compiled_backends_on_gpu(rows):
    """Compiled kernels (bf16, as decode runs them): the Triton dot up to 64 rows, cuBLASLt beyond; the fused
    norm. Against the references on the same device."""
    from autodeploy.kernels import triton_quant_fp8_linear, triton_rms_norm

    torch.manual_seed(rows)
    n, k = 272, 4096 + 64
    x, residual = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16), torch.randn(rows, k, device="cuda",
                                                                                           dtype=torch.bfloat16)
    weight, weight_scale = quantize_fp8(torch.randn(n, k, device="cuda") / k**0.5, True)
    q, scale, added = triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, torch.ones(k, device="cuda",
                                                                                          dtype=torch.bfloat16), 1e-6)
    ref_q, ref_scale, ref_added = ops.fused_add_rms_norm_quant_fp8(x, residual, torch.ones(k, device="cuda",
                                                                                          dtype=torch.bfloat16), 1e-6)
    assert torch.equal(added, ref_added) and (q.float() != ref_q.float()).float().mean() < 0.01
    torch.testing.assert_close(scale, ref_scale, rtol=1e-2, atol=0)
    got = triton_quant_fp8_linear.fp8_linear_quantized_input(q, scale, weight, weight_scale, None, torch.bfloat16)
    ref = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, None, torch.bfloat16)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
