"""use_int_gemv: the INT linears tinygemm does not take (INT8, INT4 with float32 activations) decode through the
interleaved GEMV (kernels/triton_int_gemv.py) on their re-packed codes; more rows run the Triton backend on the
same codes with x's columns gathered into their order, and the canonical codes are gone.

The transform runs on CUDA only; here its rewrite runs on the CPU (the GEMV in Triton's interpreter, the backend
as the reference) on the tiny Llama: fused q/k/v and gate/up, o and down of both layers."""

from __future__ import annotations

import pytest
import torch

from autodeploy.bench.device import bytes_read_per_token
from autodeploy.errors import RecipeError
from autodeploy.graph_utils import finalize, weight_bytes
from autodeploy.kernels.quant_format import quantize_int
from autodeploy.kernels.triton_int_gemv import gemv_coefficients, interleave_codes, interleaved_columns
from autodeploy.optimizer import optimize_model
from autodeploy.recipe import load_recipe
from autodeploy.transforms.use_int_gemv import rewrite_int_linears

GEMV_OP = "autodeploy.int_linear_gemv.default"
TRITON_INT = ["transforms.select_backends.backends.int_linear=triton", "transforms.insert_kv_cache.enabled=false"]


def _gemv_ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == GEMV_OP]


def _assert_close(got, want, tol):
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol * want.float().abs().max().item())


def test_transform_does_nothing_on_cpu(tiny_llama_dir):
    opt = optimize_model(tiny_llama_dir, overrides=["quantization.algo=int8"] + TRITON_INT, progress=False)
    report = next(r for r in opt.reports if r.name == "use_int_gemv")
    assert report.matched == {"rewritten": 0} and not _gemv_ops(opt.gm)


def _nbytes(gm, nodes) -> int:
    return sum(gm.get_parameter(n.target).numel() * gm.get_parameter(n.target).element_size() for n in nodes if n)


@pytest.mark.parametrize("quant,dtype,tol", [
    (["quantization.algo=int8", "quantization.group_size=-1"], "bfloat16", 2e-2),
    (["quantization.algo=int8", "quantization.group_size=32"], "float32", 1e-4),
    (["quantization.algo=int4", "quantization.group_size=32"], "float32", 1e-4),  # tinygemm takes bf16 only
])
@pytest.mark.parametrize("rows", [1, 4])
def test_rewrite_keeps_the_numbers_and_one_copy(tiny_llama_dir, quant, dtype, tol, rows):
    """Up to `rows` rows run the GEMV, more the backend on gathered columns: the logits stay; the canonical codes
    are deleted, and one row reads the re-packed codes and coefficients only."""
    opt = optimize_model(tiny_llama_dir, overrides=quant + [f"model.dtype={dtype}"] + TRITON_INT, progress=False)
    one, several = torch.randint(0, 256, (1, 1)), torch.randint(0, 256, (2, 6))
    before_one, before_several = opt.logits(one), opt.logits(several)
    linears = [n for n in opt.gm.graph.nodes if str(n.target) == "autodeploy.int_linear_triton.default"]
    codes, targets = _nbytes(opt.gm, [n.args[1] for n in linears]), [n.args[1].target for n in linears]
    bytes_before, read_before = weight_bytes(opt.gm), bytes_read_per_token(opt.gm)
    counts = rewrite_int_linears(opt.gm, rows=rows)
    finalize(opt.gm)
    assert counts == {"rewritten": 8, "gemv_bytes": counts["gemv_bytes"]} and len(_gemv_ops(opt.gm)) == 8
    names = dict(opt.gm.named_parameters())
    assert targets and not any(t in names for t in targets)  # the canonical codes are gone
    assert weight_bytes(opt.gm) == bytes_before - codes + counts["gemv_bytes"]
    words, scales = (_nbytes(opt.gm, [n.args[i] for n in _gemv_ops(opt.gm) for i in pair]) for pair in ((1, 2), (4, 5)))
    assert bytes_read_per_token(opt.gm) == read_before - codes - scales + words  # coefficients, not scales
    _assert_close(opt.logits(one), before_one, tol)
    _assert_close(opt.logits(several), before_several, tol)


def test_rewrite_counts_what_it_skips(tiny_llama_dir):
    """INT4 groups of 16 are smaller than a thread's 4 words (32 columns): every linear stays as it was."""
    opt = optimize_model(tiny_llama_dir, progress=False,
                         overrides=["quantization.algo=int4", "quantization.group_size=16"] + TRITON_INT)
    assert rewrite_int_linears(opt.gm, rows=1) == {"rewritten": 0, "gemv_bytes": 0, "skipped_shape": 8}


def test_columns_are_the_order_the_words_hold_as_canonical_ones():
    """The backend path: canonical int_linear on the interleaved words and gathered x == int_linear on ours."""
    g = torch.Generator().manual_seed(3)
    for bits, group in ((4, 32), (8, 16), (8, -1)):
        qweight, scales, zeros = quantize_int(torch.randn(24, 96, generator=g), bits, group, False)
        x = torch.randn(5, 96, generator=g)
        want = torch.ops.autodeploy.int_linear(x, qweight, scales, zeros, None, None, bits, group)
        got = torch.ops.autodeploy.int_linear(x[:, interleaved_columns(96, bits)], interleave_codes(qweight, bits),
                                              scales, zeros, None, None, bits, group)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_rows_is_validated_and_the_transform_follows_tinygemm():
    with pytest.raises(RecipeError, match="rows must be 0 .. 4"):
        load_recipe(overrides=["transforms.use_int_gemv.rows=5"])
    names = list(load_recipe().transforms)
    assert names.index("use_int_gemv") == names.index("use_int4_tinygemm") + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,group", [(8, -1), (4, 128)])
@pytest.mark.parametrize("rows", [1, 4, 5, 64])
def test_op_on_gpu(bits, group, rows):
    """The op at the 8B down projection's shape: the GEMV (up to 4 rows), the skinny and the dequantize paths on
    gathered columns, against int_linear on the canonical codes."""
    g = torch.Generator().manual_seed(rows)
    qweight, scales, zeros = (t.cuda() for t in quantize_int(torch.randn(4096, 14336, generator=g) / 120, bits, group,
                                                                False))
    scales, zeros = scales.bfloat16(), zeros.bfloat16()
    x = torch.randn(rows, 14336, device="cuda", dtype=torch.bfloat16)
    want = torch.ops.autodeploy.int_linear(x, qweight, scales, zeros, None, None, bits, group).float()
    got = torch.ops.autodeploy.int_linear_gemv(
        x, interleave_codes(qweight, bits), gemv_coefficients(scales, zeros, bits), interleaved_columns(14336, bits, "cuda"),
        scales, zeros, None, bits, group, 4)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2 * want.abs().max().item())
