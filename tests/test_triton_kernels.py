"""Triton backends (interpreter on CPU) against the canonical torch references.

Every check draws fresh random inputs and poisons the buffers the kernel allocates (NaN), so an
element the kernel never writes fails the comparison. Shapes include odd widths and token counts.
"""

import itertools

import pytest
import torch

import autodeploy.kernels  # noqa: F401

ops = torch.ops.autodeploy
HIDDEN = [77, 576, 4096]
TOKENS = [1, 7, 33]
DTYPES = [torch.float32, torch.bfloat16]
_seed = itertools.count()


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(next(_seed))).to(dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh outputs come back full of NaN instead of whatever memory held."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


def assert_matches(backend, reference, *args):
    """backend(*args) against the reference: elementwise in float32; in bf16 by relative error norm
    against the reference in float64 (the kernels round differently from eager bf16 ops, and the
    CPU interpreter's bf16 conversions are not the GPU's)."""
    got = backend(*args)
    low_precision = any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args)
    if low_precision:
        args = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    want = reference(*args)
    for g, w in zip(got, want) if isinstance(got, tuple) else [(got, want)]:
        assert not g.isnan().any(), "unwritten (poisoned) output elements"
        if low_precision:
            assert ((g.double() - w).norm() / w.norm()).item() < 1e-2
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(hidden, tokens, dtype, poisoned):
    x, w = randn(2, tokens, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    assert_matches(ops.rms_norm_triton, ops.rms_norm, x, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_rms_norm_of_heads_in_a_fused_projection(tokens, dtype, poisoned, monkeypatch):
    """Qwen3's per-head q / k norms: [1, T, heads, 128] slices of the fused qkv output (rows 128 apart within a
    token, 1,280 between tokens) are read in place; nothing copies them first."""
    qkv, w = randn(1, tokens, 1280, dtype=dtype), randn(128, dtype=dtype)
    q, k = qkv[..., :1024].view(1, tokens, 8, 128), qkv[..., 1024:1152].view(1, tokens, 1, 128)
    from autodeploy.kernels import triton_rms_norm

    def rows_in_place(t):
        rows = as_rows(t)
        assert rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr(), "rows copied"
        return rows

    as_rows = triton_rms_norm.as_rows
    monkeypatch.setattr(triton_rms_norm, "as_rows", rows_in_place)
    for x in (q, k):
        assert_matches(ops.rms_norm_triton, ops.rms_norm, x, w, 1e-6)


def test_rms_norm_float32_weight_on_bf16(poisoned):
    """Gemma's form: a float32 weight expression scales the unrounded normalized row."""
    x, w = randn(5, 576, dtype=torch.bfloat16), 1 + randn(576)
    assert_matches(ops.rms_norm_triton, ops.rms_norm, x, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_add_rms_norm(hidden, tokens, dtype, poisoned):
    x, residual, w = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    assert_matches(ops.fused_add_rms_norm_triton, ops.fused_add_rms_norm, x, residual, w, 1e-5)


def test_fused_add_rms_norm_reference_is_add_then_norm():
    x, residual, w = randn(3, 64), randn(3, 64), randn(64)
    normed, added = ops.fused_add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(added, x + residual)
    torch.testing.assert_close(normed, ops.rms_norm(x + residual, w, 1e-6))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("inter", HIDDEN)
def test_gated_act_on_fused_gate_up(inter, tokens, dtype, activation, poisoned):
    """gate and up are the two halves of one [..., 2I] projection output, read as strided views."""
    gate, up = randn(tokens, 2 * inter, dtype=dtype).chunk(2, dim=-1)
    assert_matches(ops.gated_act_triton, ops.gated_act, gate, up, activation)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_act_on_separate_tensors(dtype, poisoned):
    gate, up = randn(2, 7, 576, dtype=dtype), randn(2, 7, 576, dtype=dtype)
    assert_matches(ops.gated_act_triton, ops.gated_act, gate, up, "silu")


def rope_inputs(tokens: int, n_heads: int, head_dim: int, dtype: torch.dtype, fused_qkv: bool):
    """q as the model has it: [1, h, s, d] after the head transpose (not contiguous), optionally
    sliced out of a fused qkv projection; cos/sin [1, 1, s, d] broadcast over heads."""
    width = n_heads * head_dim
    projection = randn(1, tokens, 3 * width if fused_qkv else width, dtype=dtype)
    q = projection[..., :width].view(1, tokens, n_heads, head_dim).transpose(1, 2)
    cos, sin = randn(1, 1, tokens, head_dim, dtype=dtype), randn(1, 1, tokens, head_dim, dtype=dtype)
    return q, cos, sin


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("n_heads,head_dim,fused_qkv", [(9, 64, True), (3, 128, False), (32, 128, True), (5, 32, False)])
def test_rope(n_heads, head_dim, fused_qkv, tokens, dtype, interleaved, poisoned):
    q, cos, sin = rope_inputs(tokens, n_heads, head_dim, dtype, fused_qkv)
    assert_matches(ops.rope_triton, ops.rope, q, cos, sin, interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_bf16_heads_float32_rotation(tokens, interleaved, poisoned):
    """OLMo 2's form (match_rope takes it): bf16 q with float32 cos / sin, products not rounded to bf16."""
    q, cos, sin = rope_inputs(tokens, 9, 64, torch.float32, fused_qkv=True)
    assert_matches(ops.rope_triton, ops.rope, q.bfloat16(), cos, sin, interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,k_heads,head_dim,tokens", [(9, 3, 64, 7), (32, 8, 128, 1), (5, 5, 32, 3)])
def test_rope_pair(q_heads, k_heads, head_dim, tokens, dtype, interleaved, poisoned):
    """q and k in one launch: each exactly what the one-tensor kernel gives it (q strided out of a fused
    projection, k contiguous), and close to the reference."""
    from autodeploy.kernels.triton_rope import rope, rope_pair

    q, cos, sin = rope_inputs(tokens, q_heads, head_dim, dtype, fused_qkv=True)
    k = rope_inputs(tokens, k_heads, head_dim, dtype, fused_qkv=False)[0].contiguous()
    assert_matches(ops.rope_pair_triton, ops.rope_pair, q, k, cos, sin, interleaved)
    q_out, k_out = rope_pair(q, k, cos, sin, interleaved)
    assert torch.equal(q_out, rope(q, cos, sin, interleaved)) and torch.equal(k_out, rope(k, cos, sin, interleaved))


def test_rope_pair_refuses_unlike_tensors():
    from autodeploy.kernels.triton_rope import rope_pair

    q, cos, sin = rope_inputs(7, 4, 64, torch.float32, fused_qkv=False)
    with pytest.raises(ValueError, match="differ in more than their heads"):
        rope_pair(q, q[:, :, :5], cos, sin)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_in_place(interleaved):
    from autodeploy.kernels.triton_rope import rope

    q, cos, sin = rope_inputs(7, 9, 64, torch.float32, fused_qkv=True)
    want = ops.rope(q, cos, sin, interleaved)
    got = rope(q, cos, sin, interleaved, out=q)
    assert got is q
    torch.testing.assert_close(q, want, atol=1e-5, rtol=1e-5)


def test_fake_impls_give_reference_shapes():
    """Backends share the canonical op's fake impl: export and shape propagation see the same op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(3, 64), torch.empty(64)
        normed, added = ops.fused_add_rms_norm_triton(x, x, w, 1e-6)
        assert normed.shape == added.shape == x.shape
        assert ops.gated_act_triton(x, x, "silu").shape == x.shape
        assert ops.gated_linear_triton(x, x, torch.empty(5, 64), None, "silu").shape == (3, 5)
        y, added = ops.add_rms_norm_linear_triton(x, x, w, 1e-6, torch.empty(5, 64), None)
        assert y.shape == (3, 5) and added.shape == x.shape
