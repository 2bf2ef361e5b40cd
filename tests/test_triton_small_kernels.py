"""Small Triton kernels against torch: the skinny linear (odd shapes, 1..16 rows, with and without bias)
and the split argmax (ties). Triton interpreter on CPU, compiled on CUDA."""

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 4096), (2, 9001)])
def test_argmax_rows_matches_torch_first_index_on_ties(rows, vocab):
    from autodeploy.kernels.triton_argmax import argmax_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)).to(device, torch.bfloat16)
    x[0, 17] = x[0, vocab - 3] = x[0, 4100 % vocab] = 100.0  # a tie across slices: the first wins
    torch.testing.assert_close(argmax_rows(x), x.argmax(dim=1), rtol=0, atol=0)
