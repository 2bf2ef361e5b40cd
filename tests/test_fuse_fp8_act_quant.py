"""fuse_fp8_act_quant: FP8 W8A8 linears read activations quantized once, in the RMSNorm where it feeds them.

The rewritten graph must give the unrewritten one's logits exactly (the ops compose to fp8_linear's
reference), and the Triton backends of the new ops must equal their references (interpreter, odd shapes)."""

import pytest
import torch
from autodeploy.kernels.quant_format import quantize_fp8
from autodeploy.optimizer import optimize_model
from test_quant_triton import poisoned  # noqa: F401  (fixture: fresh outputs full of NaN)

PROMPT = torch.tensor([[3, 17, 42, 9, 100, 7, 64, 5]])
FP8 = ["transforms.insert_kv_cache.enabled=false", "quantization.algo=fp8"]
ops = torch.ops.autodeploy


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir):
    return tiny_llama_dir


def _count(opt, op) -> int:
    return sum(n.op == "call_function" and n.target == op for n in opt.gm.graph.nodes)


@pytest.mark.parametrize("act_quant", ["group", "token"])
def test_graph_quantizes_each_activation_once_and_in_the_norm(llama_dir, act_quant):
    fp8 = FP8 + [f"quantization.act_quant={act_quant}", "quantization.act_group_size=32"]
    plain = optimize_model(llama_dir, overrides=fp8 + ["transforms.fuse_fp8_act_quant.enabled=false"], progress=False)
    fused = optimize_model(llama_dir, overrides=fp8, progress=False)
    linears = _count(plain, ops.fp8_linear.default)
    assert linears > 0 and _count(fused, ops.fp8_linear.default) == 0
    assert _count(fused, ops.fp8_linear_quantized_input.default) == linears
    report = next(r for r in fused.reports if r.name == "fuse_fp8_act_quant")
    # per layer: the input norm (fused with the previous layer's residual add, except in layer 0), the
    # attention output, the post-attention norm and the gated activation: 4 tensors, 3 of them normalized
    assert report.matched["activation_quantizations"] == 8
    assert report.matched["quantizations_in_rms_norm"] == _count(fused, ops.fused_add_rms_norm_quant_fp8.default) == 3
    assert report.matched["quantizations_in_gated_act"] == _count(fused, ops.gated_act_quant_fp8.default) == 2
    assert _count(fused, ops.gated_act.default) == 0
    group_size = 32 if act_quant == "group" else -1
    quantizations = [n for n in fused.gm.graph.nodes if n.target in (ops.fused_add_rms_norm_quant_fp8.default,
                                                                     ops.quantize_fp8_per_token.default,
                                                                     ops.gated_act_quant_fp8.default)]
    assert {n.args[-2] for n in quantizations} == {group_size} and {n.args[-1] for n in quantizations} == {None}
    assert torch.equal(fused.logits(PROMPT), plain.logits(PROMPT))


def test_static_input_scales_quantize_once_and_in_the_norm(tmp_path):
    """A ModelOpt FP8 checkpoint (static per-tensor input scales, one per GEMM): each GEMM input quantized once
    with its scale, in the RMSNorm / gated activation where they produce it; the logits exactly the unfused ones."""
    from quant_fixtures import write_modelopt_fp8
    from test_quantize_checkpoint import CONFIG, NO_CACHE, _config

    write_modelopt_fp8(tmp_path, _config())
    plain = optimize_model(tmp_path, overrides=NO_CACHE + ["transforms.fuse_fp8_act_quant.enabled=false"],
                           progress=False)
    fused = optimize_model(tmp_path, overrides=NO_CACHE, progress=False)
    linears = _count(plain, ops.fp8_linear.default)
    assert linears == 4 * CONFIG["num_hidden_layers"] and _count(fused, ops.fp8_linear.default) == 0
    assert _count(fused, ops.fp8_linear_quantized_input.default) == linears
    report = next(r for r in fused.reports if r.name == "fuse_fp8_act_quant")
    assert report.matched["activation_quantizations"] == linears  # one static scale per GEMM input
    assert report.matched["quantizations_in_rms_norm"] == 3 and report.matched["quantizations_in_gated_act"] == 2
    quantizations = [n for n in fused.gm.graph.nodes if n.target in (ops.fused_add_rms_norm_quant_fp8.default,
                                                                     ops.quantize_fp8_per_token.default,
                                                                     ops.gated_act_quant_fp8.default)]
    assert all(n.args[-2] == -1 and n.args[-1].op == "get_attr" for n in quantizations)
    fused.gm.graph.lint()
    assert torch.equal(fused.logits(PROMPT), plain.logits(PROMPT))


def test_other_activation_scales_are_left_alone(llama_dir):
    fused = optimize_model(llama_dir, overrides=FP8 + ["quantization.act_quant=tensor"], progress=False)
    assert _count(fused, ops.fp8_linear_quantized_input.default) == 0 and _count(fused, ops.fp8_linear.default) > 0


# rows, N, K, activation group size (-1: per token): K 200 / 160 / 576 leave a short last group, 64 < 128 is one
# group; 1 row takes the GEMV (K in whole 16-column blocks), 2-21 rows the weights-as-A-operand dot, 70 the dot
# tiled over rows (past QUANTIZED_X_ROWS)
CASES = [(1, 40, 96, -1), (3, 72, 200, -1), (21, 64, 128, -1), (3, 72, 200, 32), (1, 37, 576, 128),
         (21, 40, 160, 32), (2, 24, 64, 128), (70, 24, 160, 32),
         (3, 24, 2176, 128), (1, 16, 4160, 2048),  # groups over several column tiles; a group wider than a tile
         (20, 24, 8200, -1)]  # per-token rows past 16 with K past QUANTIZED_X_LONG_K: the dot split in two


@pytest.mark.parametrize("rows,n,k,group_size", CASES)
def test_triton_backends_equal_references(rows, n, k, group_size, poisoned):
    from autodeploy.kernels import triton_fp8_act_quant, triton_gated_act, triton_quant_fp8_linear, triton_rms_norm

    torch.manual_seed(rows + k)
    x, residual = torch.randn(rows, k) * torch.linspace(0.05, 4, k), torch.randn(rows, k)
    norm_weight = torch.rand(k) + 0.5
    weight, weight_scale = quantize_fp8(torch.randn(n, k), True)
    bias = torch.randn(n)

    q, scale = triton_fp8_act_quant.quantize_fp8_per_token(x, group_size)
    ref_q, ref_scale = ops.quantize_fp8_per_token(x, group_size)
    assert scale.shape == (rows, 1 if group_size == -1 else -(-k // group_size))
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_scale)

    got = triton_quant_fp8_linear.given_fp8_linear(q, scale, weight, weight_scale, bias, torch.float32, group_size)
    ref = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.float32, group_size)
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    act_quant = "token" if group_size == -1 else "group"
    assert torch.equal(ref, ops.fp8_linear(x, weight, weight_scale, None, bias, act_quant, group_size))

    (q, scale, added), (ref_q, ref_scale, ref_added) = (
        triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6, group_size),
        ops.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6, group_size))
    assert (added.dtype, added.shape) == (ref_added.dtype, ref_added.shape) and torch.equal(added, ref_added)
    _assert_quantized_close(q, scale, ref_q, ref_scale, group_size)

    gate_up = torch.randn(rows, 2 * k) * 3  # gate and up as the fused projection's strided halves
    gate, up = gate_up[:, :k], gate_up[:, k:]
    _assert_quantized_close(*triton_gated_act.gated_act_quant_fp8(gate, up, "silu", group_size),
                            *ops.gated_act_quant_fp8(gate, up, "silu", group_size), group_size)


@pytest.mark.parametrize("rows,k", [(1, 96), (5, 200), (64, 1100)])
def test_tensor_scale_kernel_equals_reference(rows, k, poisoned):
    """Dynamic per-tensor quantization (the rows' scales, then x by their largest): the reference's scale and
    e4m3 values bit for bit, the scale repeated per row; the largest row's amax is not the first row's."""
    from autodeploy.kernels.quant_linear import activation_scale, quantize_activation
    from autodeploy.kernels.triton_fp8_act_quant import quantize_tensor_fp8

    torch.manual_seed(rows + k)
    x = torch.randn(rows, k) * torch.linspace(0.5, 3, rows)[:, None]
    q, scale = quantize_tensor_fp8(x)
    want_scale = activation_scale(x, None, "tensor")
    assert scale.shape == (rows, 1) and torch.equal(scale, want_scale.expand(rows, 1))
    assert torch.equal(q.float(), quantize_activation(x, want_scale).float())


@pytest.mark.parametrize("rows,k", [(1, 96), (3, 200), (21, 576)])
def test_triton_backends_take_a_static_scale(rows, k, poisoned):
    """A static input scale (small enough that some values saturate at +-448): the three quantizing kernels
    against their references, the scale repeated per row, and composed with the GEMM, fp8_linear's reference."""
    _check_static_scale(rows, k, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows,k", [(1, 4096), (5, 4096), (64, 14336)])
def test_static_scale_kernels_on_gpu(rows, k, poisoned):
    _check_static_scale(rows, k, "cuda", torch.bfloat16)


def _check_static_scale(rows: int, k: int, device: str, dtype: torch.dtype) -> None:
    from autodeploy.kernels import triton_fp8_act_quant, triton_gated_act, triton_quant_fp8_linear, triton_rms_norm

    torch.manual_seed(rows + k)
    x = (torch.randn(rows, k) * torch.linspace(0.05, 4, k)).to(device, dtype)
    residual, norm_weight = torch.randn(rows, k).to(device, dtype), (torch.rand(k) + 0.5).to(device, dtype)
    static = torch.tensor(0.006, device=device)
    weight, weight_scale = quantize_fp8(torch.randn(40, k, device=device) / k**0.5, True)

    q, scale = triton_fp8_act_quant.quantize_fp8_per_token(x, -1, static)
    ref_q, ref_scale = ops.quantize_fp8_per_token(x, -1, static)
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, static.expand(rows, 1))
    assert (q.float().abs() == 448).any()
    got = triton_quant_fp8_linear.given_fp8_linear(q, scale, weight, weight_scale, None, torch.float32)
    want = ops.fp8_linear(x.float(), weight, weight_scale, static, None)
    whole = triton_quant_fp8_linear.prequantized_fp8_linear(x.view(rows, 1, k), weight, weight_scale, None, 128, static)
    assert whole.shape == (rows, 1, 40)  # the static scale overrides the group size: x quantized per row
    torch.testing.assert_close(whole.view(rows, 40).float(), want.to(dtype).float(), rtol=2e-2,
                               atol=2e-2 * want.abs().max().item())
    # on the GPU past one row the e4m3 tensor-core dot, whose accumulation keeps fewer bits than float32 (H200:
    # 0.5 % of the largest output at 5 and 64 rows), with the tolerance of the dot's other GPU tests
    tol = 2e-2 if device == "cuda" and rows > 1 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())

    (q, scale, added), (ref_q, ref_scale, ref_added) = (
        triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6, -1, static),
        ops.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6, -1, static))
    assert torch.equal(added, ref_added) and torch.equal(scale, static.expand(rows, 1))
    _assert_quantized_close(q, scale, ref_q, ref_scale, -1)
    gate_up = (torch.randn(rows, 2 * k) * 3).to(device, dtype)
    _assert_quantized_close(*triton_gated_act.gated_act_quant_fp8(gate_up[:, :k], gate_up[:, k:], "silu", -1, static),
                            *ops.gated_act_quant_fp8(gate_up[:, :k], gate_up[:, k:], "silu", -1, static), -1)


def _assert_quantized_close(q, scale, ref_q, ref_scale, group_size: int) -> None:
    """The kernel's rsqrt / sigmoid and reduction order may move a value by an ulp, and a value next to an e4m3
    rounding boundary then lands one e4m3 step (at most 1/8 of it) away: allow that for a few elements.
    (float32: the interpreter truncates to bf16 where GPUs round.)"""
    k = q.shape[-1]
    assert (q.dtype, scale.dtype, scale.shape) == (ref_q.dtype, ref_scale.dtype, ref_scale.shape)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    ref_scale_cols = ref_scale.repeat_interleave(k if group_size == -1 else group_size, -1)[:, :k]
    torch.testing.assert_close(q.float() * ref_scale_cols, ref_q.float() * ref_scale_cols, rtol=0.13,
                               atol=1e-3 * ref_scale.max().item())
    assert (q.float() != ref_q.float()).float().mean() < 0.03


# rows, N, K, activation group size, K tile, splits: K steps that the splits share unevenly (7 over 3), more
# splits than steps, rows tiled (block_m 16 of 21 rows: two tiles, each with its own arrival counter), two K steps
# per activation group (each step's group scale loads a step ahead)
SPLITS = [(1, 37, 448, 64, 64, 3), (3, 72, 200, 32, 32, 4), (21, 40, 160, 32, 32, 2), (2, 24, 64, 32, 32, 5),
          (5, 33, 448, -1, 64, 3), (3, 40, 448, 64, 32, 3)]


@pytest.mark.parametrize("rows,n,k,group_size,block_k,split_k", SPLITS)
def test_split_k_equals_whole_k(rows, n, k, group_size, block_k, split_k, poisoned):
    """Programs sharing an output tile's K (float32 partials summed by the last to arrive) give the unsplit sums,
    and leave the arrival counters at zero for the next call."""
    from autodeploy.kernels import triton_fp8_act_quant
    from autodeploy.kernels.triton_quant_fp8_linear import skinny_fp8_linear
    from autodeploy.kernels.triton_split_k import split_counters

    torch.manual_seed(rows + k + split_k)
    x = torch.randn(rows, k) * torch.linspace(0.05, 4, k)
    weight, weight_scale = quantize_fp8(torch.randn(n, k), True)
    bias = torch.randn(n)
    q, scale = triton_fp8_act_quant.quantize_fp8_per_token(x, group_size)
    knobs = dict(block_n=16, block_k=block_k, swap=rows < 16, x_scale=scale, out_dtype=torch.float32,
                 x_group=group_size, block_m=16)
    whole = skinny_fp8_linear(q, weight, weight_scale, None, bias, **knobs)
    split = skinny_fp8_linear(q, weight, weight_scale, None, bias, split_k=split_k, **knobs)
    assert not split.isnan().any()
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(split, ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias,
                                                                     torch.float32, group_size), rtol=1e-5, atol=1e-4)
    assert not split_counters(x.device).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("rows", [1, 5, 17, 64, 100])
def test_compiled_backends_on_gpu(rows, group_size):
    """Compiled kernels (bf16, as decode runs them): the Triton dot up to 64 rows, beyond it cuBLASLt (per token)
    or the dot tiled over rows (groups, K with a short last group); the fused norm and the act-quant kernel.
    Against the references on the same device."""
    from autodeploy.kernels import triton_fp8_act_quant, triton_gated_act, triton_quant_fp8_linear, triton_rms_norm

    torch.manual_seed(rows)
    n, k = 272, 4096 + 64
    x, residual = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16), torch.randn(rows, k, device="cuda",
                                                                                           dtype=torch.bfloat16)
    weight, weight_scale = quantize_fp8(torch.randn(n, k, device="cuda") / k**0.5, True)
    norm_weight = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    q, scale, added = triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6, group_size)
    ref_q, ref_scale, ref_added = ops.fused_add_rms_norm_quant_fp8(x, residual, norm_weight, 1e-6, group_size)
    assert torch.equal(added, ref_added) and (q.float() != ref_q.float()).float().mean() < 0.01
    torch.testing.assert_close(scale, ref_scale, rtol=1e-2, atol=0)
    q2, scale2 = triton_fp8_act_quant.quantize_fp8_per_token(x, group_size)
    ref_q2, ref_scale2 = ops.quantize_fp8_per_token(x, group_size)
    assert torch.equal(scale2, ref_scale2) and (q2.float() != ref_q2.float()).float().mean() < 0.01
    q3, scale3 = triton_gated_act.gated_act_quant_fp8(x, residual, "silu", group_size)
    ref_q3, ref_scale3 = ops.gated_act_quant_fp8(x, residual, "silu", group_size)
    torch.testing.assert_close(scale3, ref_scale3, rtol=1e-2, atol=0)
    assert (q3.float() != ref_q3.float()).float().mean() < 0.01
    got = triton_quant_fp8_linear.fp8_linear_quantized_input(q, scale, weight, weight_scale, None, torch.bfloat16,
                                                             group_size)
    ref = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, None, torch.bfloat16, group_size)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [3, 4, 16, 20, 64, 65, 68, 300])
def test_block_scaled_gemm_from_4_rows_on_gpu(rows, poisoned):
    """Group scales of 128 from 4 rows go to cuBLASLt's 1 x 128 block-scaled GEMM where it exists (sm_90, CUDA
    12.9+) and takes the row count, else the Triton dot: either way the reference's sums, with the bias."""
    from autodeploy.kernels import triton_fp8_act_quant, triton_quant_fp8_linear

    torch.manual_seed(rows)
    n, k = 272, 4096
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * torch.linspace(0.05, 4, k, device="cuda")
    weight, weight_scale = quantize_fp8(torch.randn(n, k, device="cuda") / k**0.5, True)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    q, scale = triton_fp8_act_quant.quantize_fp8_per_token(x, 128)
    got = triton_quant_fp8_linear.given_fp8_linear(q, scale, weight, weight_scale, bias, torch.bfloat16, 128)
    ref = ops.fp8_linear_quantized_input(q, scale, weight, weight_scale, bias, torch.bfloat16, 128)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())



@pytest.mark.parametrize("rows, n, path", [(1, 256, "gemv"), (2, 256, "dot"), (3, 256, "dot"), (4, 256, "blockwise"),
                                           (16, 256, "blockwise"), (64, 8192 + 16, "blockwise"),
                                           (65, 8192 + 16, "blockwise")])
def test_group_scaled_rows_route(monkeypatch, rows, n, path):
    """Up to FP8_GEMV_ROWS rows the GEMV; where cuBLASLt's block-scaled GEMM takes the shape, groups of 128 go to it
    from 4 rows, of any width (the H200 timings in BENCHMARKS.md session 18); else the Triton dot."""
    from autodeploy.kernels import triton_quant_fp8_linear as backend

    calls = []
    monkeypatch.setattr(backend, "_blockwise_takes", lambda *args: True)
    monkeypatch.setattr(backend, "blockwise_scaled_mm", lambda q2, *args: calls.append("blockwise") or "blockwise")
    monkeypatch.setattr(backend, "skinny_fp8_linear", lambda *args, **kwargs: calls.append("dot") or "dot")
    monkeypatch.setattr(backend, "fp8_gemv", lambda *args, **kwargs: calls.append("gemv") or "gemv")
    q = torch.zeros(rows, 256, dtype=torch.float8_e4m3fn)
    weight = torch.zeros(n, 256, dtype=torch.float8_e4m3fn)
    backend.given_fp8_linear(q, torch.ones(rows, 2), weight, torch.ones(n), None, torch.bfloat16, 128)
    assert calls == [path]
