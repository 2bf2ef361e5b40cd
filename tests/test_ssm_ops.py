"""State-space / linear-attention ops: the references against HF's own torch paths (gated delta rule,
causal conv1d) or an independent quadratic form (Mamba-1/2 scans), and the cached (state-slot) forms
against the plain ones on packed batches: chunked prefill, decode, fresh sequences in dirty slots."""

import pytest
import torch
from transformers.models.mamba import modeling_mamba as mamba
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

import autodeploy.kernels  # noqa: F401
from autodeploy.export.patches.ssm_functions import _mamba_selective_scan

ops = torch.ops.autodeploy
G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G)


# (cached tokens, new tokens) per sequence of one packed step, as for cached attention
STEPS = [[(0, 5), (0, 1), (0, 9)], [(5, 3), (1, 1), (9, 1)], [(8, 1), (2, 4), (10, 1)]]


def run_packed(cached_op, plain_op, seq_inputs, token_dim, state_shape, extra=(), plain_extra=()):
    """Feed each sequence's tokens to `cached_op` step by step (STEPS) through dirty state slots and compare
    every output with `plain_op` on the whole sequence. `seq_inputs[b]` are that sequence's per-token inputs
    (batch dim 1), sliced along `token_dim`; other inputs (weights) come in `extra` / `plain_extra`."""
    slots = torch.tensor([2, 0, 3])
    states = torch.full((4, *state_shape), float("nan"))  # fresh sequences must not read their slot
    got = [[] for _ in seq_inputs]
    for step in STEPS:
        lens = torch.tensor([c + n for c, n in step], dtype=torch.int32)
        cu = torch.tensor([0] + list(torch.tensor([n for _, n in step]).cumsum(0)), dtype=torch.int32)
        packed = [torch.cat([x.narrow(token_dim, c, n) for x, (c, n) in zip(group, step)], dim=token_dim)
                  for group in zip(*seq_inputs)]
        out = cached_op(*packed, *extra, states, cu, lens, slots)
        for b, (c, n) in enumerate(step):
            got[b].append(out.narrow(token_dim, int(cu[b]), n))
    for b, inputs in enumerate(seq_inputs):
        want = plain_op(*inputs, *plain_extra)
        torch.testing.assert_close(torch.cat(got[b], dim=token_dim), want, atol=1e-5, rtol=1e-5)


LENGTHS = [sum(step[b][1] for step in STEPS) for b in range(3)]  # 9, 6, 11 tokens


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_hf(activation):
    x, w, bias = rand(2, 6, 11), rand(6, 4), rand(6)
    want = qwen3_next.causal_conv1d_fn(x, w, bias, activation=activation)
    torch.testing.assert_close(ops.causal_conv1d(x, w, bias, activation), want, atol=1e-5, rtol=1e-5)


def test_cached_causal_conv1d_decode_matches_hf_update():
    x, w = rand(1, 6, 7), rand(6, 4)
    states = rand(3, 6, 3)
    hf_state = states[1:2].clone()
    want = qwen3_next.causal_conv1d_update(x[:, :, -1:], hf_state, w, None, "silu")
    got = ops.cached_causal_conv1d(x[:, :, -1:], w, None, "silu", states, torch.tensor([0, 1], dtype=torch.int32),
                                   torch.tensor([7], dtype=torch.int32), torch.tensor([1]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[1], hf_state[0])


def test_cached_causal_conv1d_carries_state():
    w, bias = rand(5, 4), rand(5)
    seqs = [(rand(1, 5, n),) for n in LENGTHS]
    run_packed(ops.cached_causal_conv1d, ops.causal_conv1d, seqs, 2, (5, 3), (w, bias, "silu"), (w, bias, "silu"))


def delta_inputs(s, h_k=2, h_v=4, d_k=8, d_v=6):
    return (rand(1, s, h_k, d_k), rand(1, s, h_k, d_k), rand(1, s, h_v, d_v),
            -torch.rand(1, s, h_v, generator=G), torch.rand(1, s, h_v, generator=G))


def test_gated_delta_rule_matches_hf():
    q, k, v, g, beta = delta_inputs(13)
    got = ops.gated_delta_rule(q, k, v, g, beta, True)
    recurrent, _ = qwen3_next.torch_recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    chunked, _ = qwen3_next.torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4,
                                                                      use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(got, recurrent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, chunked, atol=1e-4, rtol=1e-4)


def test_cached_gated_delta_rule_carries_state():
    seqs = [delta_inputs(n) for n in LENGTHS]
    run_packed(ops.cached_gated_delta_rule, ops.gated_delta_rule, seqs, 1, (4, 8, 6), (True,), (True,))


def ssd_quadratic(x, dt, a, b, c, d, dt_bias):
    """Mamba-2 as (masked) attention: y_t = sum_{s<=t} C_t.B_s exp(sum_{s<r<=t} dt_r A) dt_s x_s + D x_t."""
    dt = torch.nn.functional.softplus(dt + dt_bias)[0]  # [s, h]
    rep = x.shape[2] // b.shape[2]
    b, c = b[0].repeat_interleave(rep, 1), c[0].repeat_interleave(rep, 1)  # [s, h, n]
    cum = (dt * a).cumsum(0)  # [s, h]
    decay = (cum[:, None, :] - cum[None, :, :]).exp() * torch.ones(len(dt), len(dt)).tril()[:, :, None]  # [t, s, h]
    scores = torch.einsum("thn,shn->tsh", c, b) * decay * dt[None]
    return (torch.einsum("tsh,shp->thp", scores, x[0]) + d[None, :, None] * x[0])[None]


def ssd_inputs(s, h=4, p=3, g=2, n=5):
    return rand(1, s, h, p), rand(1, s, h), rand(1, s, g, n), rand(1, s, g, n)


def test_ssd_scan_matches_quadratic_form():
    a, d, dt_bias = -torch.rand(4, generator=G), rand(4), rand(4)
    x, dt, b, c = ssd_inputs(10)
    got = ops.ssd_scan(x, dt, a, b, c, d, dt_bias, True)
    torch.testing.assert_close(got, ssd_quadratic(x, dt, a, b, c, d, dt_bias), atol=1e-5, rtol=1e-5)


def test_cached_ssd_scan_carries_state():
    a, d, dt_bias = -torch.rand(4, generator=G), rand(4), rand(4)
    seqs = [ssd_inputs(n) for n in LENGTHS]

    def cached(x, dt, b, c, *rest):
        return ops.cached_ssd_scan(x, dt, a, b, c, d, dt_bias, True, 0.0, *rest)

    def plain(x, dt, b, c):
        return ops.ssd_scan(x, dt, a, b, c, d, dt_bias, True)

    run_packed(cached, plain, seqs, 1, (4, 3, 5))


def test_selective_scan_is_ssd_with_per_channel_heads():
    """Mamba-1 with A constant over the state dim is Mamba-2 with one channel per head and one group."""
    dim, n, s = 6, 4, 9
    u, delta, b, c = rand(1, dim, s), rand(1, dim, s), rand(1, n, s), rand(1, n, s)
    a_head, d, bias = -torch.rand(dim, generator=G), rand(dim), rand(dim)
    got = ops.selective_scan(u, delta, a_head[:, None].expand(dim, n).contiguous(), b, c, d, bias, True)
    want = ssd_quadratic(u.transpose(1, 2)[..., None], delta.transpose(1, 2), a_head, b.transpose(1, 2)[:, :, None],
                         c.transpose(1, 2)[:, :, None], d, bias)
    torch.testing.assert_close(got, want[..., 0].transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_mamba_selective_scan_patch_matches_hf():
    """The export patch's call (canonical op, then HF's silu gate) against HF's own token loop, batch of 2."""
    dim, n, s = 6, 4, 9
    u, delta, b, c, z = rand(2, dim, s), rand(2, dim, s), rand(2, n, s), rand(2, n, s), rand(2, dim, s)
    a, d, bias = -torch.rand(dim, n, generator=G), rand(dim), rand(dim)
    patched = _mamba_selective_scan(mamba.mamba_selective_scan)
    want = mamba.mamba_selective_scan(u, delta, a, b, c, D=d, z=z, delta_bias=bias, delta_softplus=True)
    got = patched(u, delta, a, b, c, D=d, z=z, delta_bias=bias, delta_softplus=True, use_mambapy=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    out, state = patched(u, delta, a, b, c, D=d, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)  # a final state wanted: HF's own function runs
    assert state.shape == (2, dim, n)


def test_cached_selective_scan_carries_state():
    a, d, bias = -torch.rand(6, 4, generator=G), rand(6), rand(6)
    seqs = [(rand(1, 6, n), rand(1, 6, n), rand(1, 4, n), rand(1, 4, n)) for n in LENGTHS]

    def cached(u, delta, b, c, *rest):
        return ops.cached_selective_scan(u, delta, a, b, c, d, bias, True, *rest)

    def plain(u, delta, b, c):
        return ops.selective_scan(u, delta, a, b, c, d, bias, True)

    run_packed(cached, plain, seqs, 2, (6, 4))


def test_fake_impls_keep_shapes():
    with torch._subclasses.FakeTensorMode():
        q, k, v, g, beta = (torch.empty(1, 5, 2, 8), torch.empty(1, 5, 2, 8), torch.empty(1, 5, 4, 6),
                            torch.empty(1, 5, 4), torch.empty(1, 5, 4))
        assert ops.gated_delta_rule(q, k, v, g, beta).shape == (1, 5, 4, 6)
        assert ops.causal_conv1d(torch.empty(2, 6, 11), torch.empty(6, 4)).shape == (2, 6, 11)
