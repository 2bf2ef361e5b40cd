"""fuse_attention_quant_fp8 and the decode kernel's quantizing epilogue: the o projection's e4m3 input and scales
bit for bit as the separate quantization makes them."""

import pytest
import torch
from transformers import LlamaConfig

from autodeploy.optimizer import optimize_model
from autodeploy.runtime.batch import Chunk
from autodeploy.runtime.executor import ModelExecutor

from conftest import save_tiny_checkpoint
from test_decode_attention import DEVICE, _fused_case, _poison, _rope_tables


def _quantized_both_ways(ctxs, n_heads, n_kv, head_dim, dtype=torch.float32, device=DEVICE, fp8=False, rope=False,
                         **knobs):
    """(fused (q, s), separate (q, s)) of one decode step, each on its own copy of the same inputs."""
    from autodeploy.kernels import triton_decode_attention as mod
    from autodeploy.kernels.triton_fp8_act_quant import quantize_fp8_per_token

    k_scale, v_scale = (0.02, 0.05) if fp8 else (1.0, 1.0)
    args = _fused_case(ctxs, n_heads, n_kv, head_dim, 16, len(ctxs) + head_dim, dtype, fp8, k_scale, v_scale, device)
    results = []
    for quant_group in (head_dim, None):
        q, k, v, k_cache, v_cache, cu, lens, tables, slots = (a.clone() for a in args)
        rotation = None
        if rope:
            cos, sin = (t.to(device) for t in _rope_tables(lens.cpu() - 1, head_dim, False, dtype))
            rotation = mod.rope_rows(q, cos, sin, False)
        out = mod.decode_attention(q, k_cache, v_cache, lens, tables, 0.3, k_scale=k_scale, v_scale=v_scale, k=k, v=v,
                                   slot_mapping=slots, rope=rotation, quant_group=quant_group, **knobs)
        if quant_group is None:
            out = quantize_fp8_per_token(out.transpose(1, 2).reshape(1, len(ctxs), -1), head_dim)
        results.append(out)
    return results


def _assert_same(fused, separate):
    (q, s), (want_q, want_s) = fused, separate
    assert q.shape == want_q.shape and s.shape == want_s.shape
    assert [st for st, n in zip(s.stride(), s.shape) if n > 1] == [st for st, n in zip(want_s.stride(), s.shape) if n > 1]
    assert not s.isnan().any()
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)


@pytest.mark.parametrize("knobs", [{"num_splits": 1}, {"num_splits": 4, "merge_in_kernel": False},
                                   {"num_splits": 4, "merge_in_kernel": True}])
@pytest.mark.parametrize("extra", [{}, {"fp8": True}, {"rope": True}])
@pytest.mark.parametrize("ctxs", [[70, 5, 33], [70]])
def test_epilogue_quantizes_as_the_separate_kernel(knobs, extra, ctxs, monkeypatch):
    """The single pass, the reduce kernel and the in-kernel merge each write the quantized output (one sequence:
    the scales' strides of size-1 dims may differ, the layout does not)."""
    _poison(monkeypatch)
    _assert_same(*_quantized_both_ways(ctxs, 8, 2, 32, **knobs, **extra))


def test_epilogue_takes_only_one_group_per_head():
    from autodeploy.kernels import triton_decode_attention as mod

    q, k, v, k_cache, v_cache, cu, lens, tables, slots = _fused_case([9], 4, 2, 32, 16, 0, torch.float32, False, 1.0,
                                                                     1.0, DEVICE)
    with pytest.raises(ValueError, match="value head dim 32"):
        mod.decode_attention(q, k_cache, v_cache, lens, tables, 0.3, quant_group=16)


def test_ops_fill_the_defaults_the_dispatcher_leaves_out():
    """Called without the trailing arguments (the dispatcher then hands fewer to the Python impls), the op takes
    the schema's defaults: group_size -1 (one scale per token), in fake mode too. (The Triton backend quantizes
    per head only, which fuse_attention_quant_fp8 always passes.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, k_cache, v_cache, cu, lens, tables, slots = _fused_case([9], 4, 2, 32, 16, 0, torch.float32, False, 1.0,
                                                                     1.0, "cpu")
    args = (q, k, v, k_cache, v_cache, cu, lens, tables, slots, 0.3)
    ops = torch.ops.autodeploy
    want = ops.quantize_fp8_per_token(ops.cached_attention(*(a.clone() if isinstance(a, torch.Tensor) else a
                                                               for a in args)).transpose(1, 2).reshape(1, 1, -1))
    got = ops.cached_attention_quant_fp8(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    assert torch.equal(got[1], want[1]) and got[1].shape == (1, 1, 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert ops.cached_attention_quant_fp8(*args)[1].shape == (1, 1, 1)


@pytest.fixture(scope="module")
def tiny_llama_fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_fp8")  # head dim 16: activation groups of 16 are the heads
    save_tiny_checkpoint(path, LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    return path


FP8 = ["model.device=cpu", "model.dtype=float32", "quantization.algo=fp8", "transforms.insert_kv_cache.num_blocks=16",
       "transforms.insert_kv_cache.block_size=4"]
OFF = "transforms.fuse_attention_quant_fp8.enabled=false"


def _report(opt):
    return next(r for r in opt.reports if r.name == "fuse_attention_quant_fp8").matched


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_logits_unchanged(tiny_llama_fp8, backend):
    """A prompt step, then a decode step of two sequences: the same logits with the fused op, on either backend."""
    settings = FP8 + ["quantization.act_group_size=16", f"transforms.insert_kv_cache.backend={backend}",
                      f"transforms.select_backends.backends.quantize_fp8_per_token={backend}"]
    on, off = (optimize_model(tiny_llama_fp8, overrides=settings + extra, progress=False) for extra in ([], [OFF]))
    assert _report(on) == {"attention_quant": 2}
    assert not any("quantize_fp8_per_token" in str(n.target) and n.args[0].target == torch.ops.aten.reshape.default
                   for n in on.gm.graph.nodes)
    outs = []
    for opt in (on, off):
        ex = ModelExecutor(opt.gm)
        prompt = ex._last_token_logits(ex.pack([Chunk(list(range(5, 14)), 0, [0, 1, 2]),
                                                Chunk(list(range(30, 37)), 0, [4, 5])]))
        decode = ex._last_token_logits(ex.pack([Chunk([3], 9, [0, 1, 2]), Chunk([4], 7, [4, 5])]))
        outs.append((prompt, decode))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("extra", [["quantization.act_group_size=32"], ["quantization.act_quant=token"]])
def test_other_groups_keep_the_separate_quantization(tiny_llama_fp8, extra):
    """Groups that are not the heads (32 columns: two heads; one per token) stay with quantize_fp8_per_token."""
    opt = optimize_model(tiny_llama_fp8, overrides=FP8 + extra, progress=False)
    assert _report(opt) == {"attention_quant": 0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch,ctx", [(1, 256), (1, 4096), (64, 256)])
@pytest.mark.parametrize("merge_in_kernel", [False, True])
def test_epilogue_gpu_8b_shape(batch, ctx, merge_in_kernel):
    """Llama-3.1-8B's decode attention in bf16 (32 splits at batch 1, one pass at 64) with RoPE inside."""
    ctxs = [ctx - 37 * b % 200 for b in range(batch)]
    _assert_same(*_quantized_both_ways(ctxs, 32, 8, 128, torch.bfloat16, "cuda", rope=True,
                                       merge_in_kernel=merge_in_kernel))
