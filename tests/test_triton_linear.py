"""The skinny linear kernel against F.linear: odd shapes, 1..16 rows, with and without bias
(Triton interpreter on CPU, compiled on CUDA)."""

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("rows,n,k", [(1, 37, 300), (3, 64, 256), (16, 130, 96), (5, 16, 513)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_torch(rows, n, k, bias):
    from autodeploy.kernels.triton_linear import skinny_linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device)
    b = torch.randn(n, generator=gen).to(device) if bias else None
    got = skinny_linear(x[None], w, b, block_n=16, block_k=64)
    assert got.shape == (1, rows, n)
    torch.testing.assert_close(got[0], F.linear(x, w, b), atol=2e-2, rtol=2e-2)  # tf32 dots on CUDA


def test_backend_sends_many_rows_and_float32_to_torch():
    from autodeploy.kernels.triton_linear import linear

    x, w = torch.randn(40, 8), torch.randn(6, 8)
    assert torch.equal(linear(x, w), F.linear(x, w))  # CPU / float32 / 40 rows: the torch path
