"""Small Triton kernels against torch: the skinny linear (odd shapes, 1..16 rows, with and without bias), its
gated prologue (gated_linear), its residual add + RMSNorm prologue (add_rms_norm_linear) and the split argmax
(ties). Triton interpreter on CPU, compiled on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from test_triton_kernels import poisoned  # noqa: F401  (fixture: fresh outputs full of NaN)

ops = torch.ops.autodeploy
ACTIVATIONS = ["silu", "gelu", "gelu_tanh", "relu"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BF16_ON_GPU = pytest.param(torch.bfloat16, marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter's bf16 dot is wrong)")])


@pytest.mark.parametrize("rows,n,k", [(1, 37, 300), (3, 64, 256), (16, 130, 96), (5, 16, 513)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
def test_skinny_linear_matches_torch(rows, n, k, bias, dtype):
    from autodeploy.kernels.triton_linear import skinny_linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    got = skinny_linear(x[None], w, b, block_n=16, block_k=64)
    assert got.shape == (1, rows, n)
    torch.testing.assert_close(got[0], F.linear(x, w, b), atol=2e-2, rtol=2e-2)  # tf32 dots on CUDA


def test_backend_sends_many_rows_and_float32_to_torch():
    from autodeploy.kernels.triton_linear import linear

    x, w = torch.randn(40, 8), torch.randn(6, 8)
    assert torch.equal(linear(x, w), F.linear(x, w))  # CPU / float32 / 40 rows: the torch path


def gate_and_up(rows: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of one [rows, 2K] projection output: strided views, as after fuse_shared_input_linears."""
    fused = torch.randn(rows, 2 * k, generator=torch.Generator().manual_seed(seed)) * 2
    return fused.to(DEVICE, dtype).chunk(2, dim=-1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows,n,k,bias", [(1, 37, 300, True), (1, 64, 256, False), (1, 131, 96, True)])
@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
def test_skinny_gated_linear_matches_reference(rows, n, k, bias, activation, dtype, poisoned):
    """K 300 and 96 end in a short block of 64, N 37 and 131 in a short block of 16."""
    from autodeploy.kernels.triton_linear import skinny_linear

    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    gate, up = gate_and_up(rows, k, dtype, seed=n + k)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    got = skinny_linear(gate, w, b, block_n=16, block_k=64, up=up, activation=activation)
    assert not got.isnan().any(), "unwritten (poisoned) output elements"
    torch.testing.assert_close(got, ops.gated_linear(gate, up, w, b, activation), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_prologue_rounds_as_gated_act(activation, poisoned):
    """Through an identity weight the GEMM returns its input rows: bf16 act(gate) * up bit for bit as the gated_act
    kernel gives it (the weight is float32 because the interpreter's bf16 dot is wrong; tf32 holds bf16 exactly)."""
    from autodeploy.kernels.triton_gated_act import gated_act
    from autodeploy.kernels.triton_linear import skinny_linear

    gate, up = gate_and_up(1, 200, torch.bfloat16, seed=len(activation))
    identity = torch.eye(200, device=DEVICE)
    got = skinny_linear(gate, identity, block_n=16, block_k=64, up=up, activation=activation)
    assert torch.equal(got, gated_act(gate, up, activation))


def test_prologues_take_one_row():
    """The GATED / NORM prologues compute one row (every program repeats them): more rows are refused."""
    from autodeploy.kernels.triton_linear import NormPrologue, skinny_linear

    gate, up = gate_and_up(2, 64, torch.float32, seed=0)
    w = torch.randn(16, 64, device=DEVICE)
    with pytest.raises(ValueError, match="take 1 row"):
        skinny_linear(gate, w, up=up, activation="silu")
    with pytest.raises(ValueError, match="take 1 row"):
        skinny_linear(gate, w, norm=NormPrologue(up, torch.ones(64, device=DEVICE), 1e-6, torch.empty_like(gate)))


@pytest.mark.parametrize("rows", [1, 2, 17])
def test_gated_linear_backend(rows):
    """On CUDA one row takes the gated prologue, more the gated_act kernel and the linear; on CPU always the latter."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    gate, up = gate_and_up(rows, 96, dtype, seed=rows)
    w = (torch.randn(40, 96, generator=torch.Generator().manual_seed(rows)) / 96 ** 0.5).to(DEVICE, dtype)
    got = ops.gated_linear_triton(gate, up, w, None, "gelu_tanh")
    torch.testing.assert_close(got, ops.gated_linear(gate, up, w, None, "gelu_tanh"), atol=2e-2, rtol=2e-2)


def norm_inputs(rows: int, k: int, dtype: torch.dtype, seed: int, norm_dtype: torch.dtype | None = None):
    """x, residual (a view with a row stride of 2k, read in place) and the norm weight."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=gen) * 2).to(DEVICE, dtype)
    residual = torch.randn(rows, 2 * k, generator=gen).to(DEVICE, dtype)[:, k:]
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(DEVICE, norm_dtype or dtype)
    return x, residual, norm_weight


def skinny_norm_linear(x, residual, norm_weight, weight, bias=None, eps=1e-6):
    """The NORM prologue launched directly (any device and dtype, small blocks): (y, added)."""
    from autodeploy.kernels.triton_linear import NormPrologue, skinny_linear

    added = torch.empty_like(x)
    y = skinny_linear(x, weight, bias, block_n=16, block_k=64, norm=NormPrologue(residual, norm_weight, eps, added))
    assert not y.isnan().any() and not added.isnan().any(), "unwritten (poisoned) output elements"
    return y, added


@pytest.mark.parametrize("rows,n,k,bias", [(1, 37, 300, True), (1, 64, 256, False), (1, 131, 96, True)])
@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
def test_skinny_add_rms_norm_linear_matches_reference(rows, n, k, bias, dtype, poisoned):
    """K 300 and 96 end in a short block of 64, N 37 and 131 in a short block of 16; `added` is exact."""
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, residual, norm_weight = norm_inputs(rows, k, dtype, seed=n + k)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    y, added = skinny_norm_linear(x, residual, norm_weight, w, b)
    want_y, want_added = ops.add_rms_norm_linear(x, residual, norm_weight, 1e-6, w, b)
    assert torch.equal(added, want_added)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # tf32 / bf16 dots on CUDA
    torch.testing.assert_close(y, want_y, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("norm_dtype", [torch.bfloat16, torch.float32])
def test_norm_prologue_rounds_as_fused_add_rms_norm(norm_dtype, poisoned):
    """Through an identity weight the GEMM returns its input rows: bf16 normalized rows as the fused_add_rms_norm
    kernel gives them, with a bf16 norm weight (normed rounded before the weight) and a float32 one (not), up to
    the float32 order of the sum of squares (the weight is float32: the interpreter's bf16 dot is wrong)."""
    from autodeploy.kernels.triton_rms_norm import fused_add_rms_norm

    x, residual, norm_weight = norm_inputs(1, 200, torch.bfloat16, seed=7, norm_dtype=norm_dtype)
    y, added = skinny_norm_linear(x, residual, norm_weight, torch.eye(200, device=DEVICE))
    want_y, want_added = fused_add_rms_norm(x, residual, norm_weight, 1e-6)
    assert torch.equal(added, want_added)
    torch.testing.assert_close(y, want_y, atol=0, rtol=2 ** -7)  # at most one bf16 step apart (equal here)


@pytest.mark.parametrize("extra_rows", [0, 1])
def test_add_rms_norm_linear_backend(extra_rows, poisoned):
    """On CUDA PROLOGUE_ROWS rows take the NORM prologue, more the fused_add_rms_norm kernel and `linear`; on CPU
    always the latter."""
    from autodeploy.kernels.triton_linear import PROLOGUE_ROWS

    rows = PROLOGUE_ROWS + extra_rows
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x, residual, norm_weight = norm_inputs(rows, 96, dtype, seed=rows)
    w = (torch.randn(40, 96, generator=torch.Generator().manual_seed(rows)) / 96 ** 0.5).to(DEVICE, dtype)
    y, added = ops.add_rms_norm_linear_triton(x, residual, norm_weight, 1e-6, w, None)
    want_y, want_added = ops.add_rms_norm_linear(x, residual, norm_weight, 1e-6, w, None)
    assert torch.equal(added, want_added)
    torch.testing.assert_close(y, want_y, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("n", [6144, 28672])  # Llama-3.1-8B's fused q/k/v and gate/up
def test_add_rms_norm_linear_at_8b_decode_shapes(rows, n, poisoned):
    """The backend's NORM prologue (with the sizes' real knobs) against the reference in bf16, K 4096."""
    x, residual, norm_weight = norm_inputs(rows, 4096, torch.bfloat16, seed=rows)
    w = (torch.randn(n, 4096, device="cuda") / 64).to(torch.bfloat16)
    y, added = ops.add_rms_norm_linear_triton(x, residual, norm_weight, 1e-5, w, None)
    want_y, want_added = ops.add_rms_norm_linear(x, residual, norm_weight, 1e-5, w, None)
    assert not y.isnan().any() and not added.isnan().any(), "unwritten (poisoned) output elements"
    assert torch.equal(added, want_added)
    torch.testing.assert_close(y, want_y, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 4096), (2, 9001)])
def test_argmax_rows_matches_torch_first_index_on_ties(rows, vocab):
    from autodeploy.kernels.triton_argmax import argmax_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)).to(device, torch.bfloat16)
    x[0, 17] = x[0, vocab - 3] = x[0, 4100 % vocab] = 100.0  # a tie across slices: the first wins
    torch.testing.assert_close(argmax_rows(x), x.argmax(dim=1), rtol=0, atol=0)
