"""cached_attention: the reference against dense causal attention, and the Triton backend
(interpreter on CPU) against the reference, on mixed prefill/decode packed batches."""

import pytest
import torch

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.attention import causal_mask

BLOCK_SIZE = 16


def dense_attention(q, k, v, scale, sliding_window=None, logit_cap=None):
    """Plain causal attention over one whole sequence: q [h, s_q, d] aligned with the last keys of k/v [h_kv, s_k, d]."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = q @ k.transpose(1, 2) * scale
    if logit_cap is not None:
        s = logit_cap * torch.tanh(s / logit_cap)
    s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1], sliding_window, q.device), float("-inf"))
    return s.softmax(-1) @ v


def packed_case(seqs, n_heads, n_kv, head_dim, num_blocks=64, seed=0, v_head_dim=None):
    """Random packed batch: `seqs` is a list of (cached_len, new_len); blocks are handed out shuffled.

    Returns op arguments plus each sequence's full k/v and queries for a dense check."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, n_kv, head_dim)
    v_head_dim = v_head_dim or head_dim
    v_cache = torch.zeros(num_blocks, BLOCK_SIZE, n_kv, v_head_dim)
    free = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-(c + n) // BLOCK_SIZE) for c, n in seqs)
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    qs, ks, vs, slots, full = [], [], [], [], []
    cu = [0]
    for b, (cached, new) in enumerate(seqs):
        total = cached + new
        blocks = [free.pop() for _ in range(-(-total // BLOCK_SIZE))]
        block_tables[b, : len(blocks)] = torch.tensor(blocks)
        k_all = torch.randn(n_kv, total, head_dim, generator=g)
        v_all = torch.randn(n_kv, total, v_head_dim, generator=g)
        q_new = torch.randn(n_heads, new, head_dim, generator=g)
        pos_slots = [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(total)]
        for p in range(cached):  # earlier steps already wrote these
            k_cache.view(-1, n_kv, head_dim)[pos_slots[p]] = k_all[:, p]
            v_cache.view(-1, n_kv, v_head_dim)[pos_slots[p]] = v_all[:, p]
        slots += pos_slots[cached:]
        qs.append(q_new), ks.append(k_all[:, cached:]), vs.append(v_all[:, cached:])
        full.append((q_new, k_all, v_all))
        cu.append(cu[-1] + new)
    args = (
        torch.cat(qs, 1)[None], torch.cat(ks, 1)[None], torch.cat(vs, 1)[None], k_cache, v_cache,
        torch.tensor(cu, dtype=torch.int32), torch.tensor([c + n for c, n in seqs], dtype=torch.int32),
        block_tables, torch.tensor(slots, dtype=torch.int64),
    )
    return args, full


MIXED = [(0, 37), (15, 1), (16, 1), (31, 2), (0, 1), (47, 17), (5, 1)]


@pytest.mark.parametrize("sliding_window,logit_cap", [(None, None), (8, None), (None, 5.0), (20, 30.0)])
def test_reference_matches_dense(sliding_window, logit_cap):
    args, full = packed_case(MIXED, n_heads=8, n_kv=2, head_dim=32)
    scale = 32 ** -0.5
    out = torch.ops.autodeploy.cached_attention(*args, scale, sliding_window, logit_cap)
    cu = args[5].tolist()
    for b, (q, k, v) in enumerate(full):
        want = dense_attention(q, k, v, scale, sliding_window, logit_cap)
        torch.testing.assert_close(out[0, :, cu[b]:cu[b + 1]], want, atol=1e-5, rtol=1e-5)


def test_reference_writes_cache():
    args, full = packed_case([(3, 5)], n_heads=2, n_kv=1, head_dim=8)
    torch.ops.autodeploy.cached_attention(*args, 1.0)
    k_cache, block_tables = args[3], args[7]
    _, k_all, _ = full[0]
    cached = k_cache[block_tables[0].long()].flatten(0, 1)[:8]
    torch.testing.assert_close(cached[:, 0], k_all[0])


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_matches_reference(group, head_dim):
    n_kv = 2 if group < 8 else 1
    args, _ = packed_case(MIXED, n_heads=n_kv * group, n_kv=n_kv, head_dim=head_dim, seed=group + head_dim)
    scale = head_dim ** -0.5
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, scale)
    got = torch.ops.autodeploy.cached_attention_triton(*args, scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(args[3], ref_args[3])  # both wrote the same cache


# Long contexts: key tiles wholly visible to a query tile (no mask) before the diagonal's, for prompts and for
# chunks after cached tokens.
LONG = {"prompts": [(0, 300), (70, 260)], "after cached tokens": [(100, 40), (0, 70), (200, 3)]}


@pytest.mark.parametrize("batch", sorted(LONG))
@pytest.mark.parametrize("n_heads,n_kv", [(8, 2), (6, 2), (2, 2)])  # query heads per KV head: 4 packed, 3, 1
@pytest.mark.parametrize("sliding_window", [None, 50])
def test_triton_long_contexts(batch, n_heads, n_kv, sliding_window):
    args, _ = packed_case(LONG[batch], n_heads=n_heads, n_kv=n_kv, head_dim=32, num_blocks=64, seed=n_heads)
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, 0.15, sliding_window)
    got = torch.ops.autodeploy.cached_attention_triton(*args, 0.15, sliding_window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sliding_window,logit_cap", [(7, None), (None, 20.0), (33, 10.0)])
def test_triton_window_and_cap(sliding_window, logit_cap):
    args, _ = packed_case(MIXED, n_heads=4, n_kv=2, head_dim=64, seed=3)
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, 0.125, sliding_window, logit_cap)
    got = torch.ops.autodeploy.cached_attention_triton(*args, 0.125, sliding_window, logit_cap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_value_head_dim_may_differ_from_query_head_dim():
    """DeepSeek's MLA attends with q/k head dim 48 and v head dim 32 (zoo config)."""
    args, full = packed_case(MIXED, n_heads=4, n_kv=4, head_dim=48, v_head_dim=32, seed=5)
    ref_args = tuple(a.clone() for a in args)
    want = torch.ops.autodeploy.cached_attention(*ref_args, 0.2)
    cu = args[5].tolist()
    for b, (q, k, v) in enumerate(full):
        torch.testing.assert_close(want[0, :, cu[b]:cu[b + 1]], dense_attention(q, k, v, 0.2), atol=1e-5, rtol=1e-5)
    got = torch.ops.autodeploy.cached_attention_triton(*args, 0.2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_fake_shapes_under_export_style_tracing():
    args, _ = packed_case([(2, 3)], n_heads=4, n_kv=2, head_dim=16)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) for a in args)
        out = torch.ops.autodeploy.cached_attention(*fake, 0.25)
    assert out.shape == args[0].shape
