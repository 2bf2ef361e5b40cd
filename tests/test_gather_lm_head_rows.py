"""gather_lm_head_rows: the LM head projects only the sampled rows, and nothing a step returns changes."""

import pytest
import torch
from transformers import Gemma2Config

from autodeploy.kernels.triton_backends import BACKENDS
from autodeploy.optimizer import optimize_model
from autodeploy.runtime.batch import Chunk
from autodeploy.runtime.executor import ModelExecutor
from autodeploy.runtime.kv_cache import LOGIT_ROWS_KEY
from autodeploy.transforms.gather_lm_head_rows import GatherLmHeadRows, take_rows

from conftest import save_tiny_checkpoint

CPU_F32 = ["model.device=cpu", "model.dtype=float32", "transforms.insert_kv_cache.num_blocks=16",
           "transforms.insert_kv_cache.block_size=4"]
OFF = "transforms.gather_lm_head_rows.enabled=false"


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return optimize_model(tiny_llama_dir, overrides=CPU_F32, progress=False)


@pytest.fixture(scope="module")
def llama_off(tiny_llama_dir):
    return optimize_model(tiny_llama_dir, overrides=CPU_F32 + [OFF], progress=False)


def _report(opt):
    return next(r for r in opt.reports if r.name == "gather_lm_head_rows")


def test_rows_taken_before_the_lm_head(llama, llama_off):
    assert _report(llama).matched == {"gathered_lm_head": 1} and not _report(llama).warnings
    placeholders = [n for n in llama.gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[-1].name == "logit_rows" and llama.gm.meta[LOGIT_ROWS_KEY]
    (taken,) = [n for n in llama.gm.graph.nodes if n.target is take_rows]
    (head,) = taken.users
    assert head.target == torch.ops.autodeploy.linear.default and head.args[1].target.endswith("lm_head.weight")
    assert not llama_off.gm.meta.get(LOGIT_ROWS_KEY)


def test_head_found_on_its_backend(tiny_llama_dir):
    """select_backends swaps the LM head's op (Triton on CUDA) before the cache stage."""
    opt = optimize_model(tiny_llama_dir, overrides=CPU_F32 + ["transforms.select_backends.backends.linear=triton"],
                         progress=False)
    assert _report(opt).matched == {"gathered_lm_head": 1}
    (taken,) = [n for n in opt.gm.graph.nodes if n.target is take_rows]
    assert [u.target for u in taken.users] == [torch.ops.autodeploy.linear_triton.default]


def test_step_and_full_logits_equal_the_ungathered_graph(llama, llama_off):
    """A prompt chunk next to a decode (last-token rows), then every row (perplexity's view)."""
    rng = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (n,), generator=rng).tolist() for n in (9, 6))
    outs = []
    for opt in (llama, llama_off):
        ex = ModelExecutor(opt.gm)
        ex.forward(ex.pack([Chunk(a[:8], 0, [0, 1])]))
        step = ex._last_token_logits(ex.pack([Chunk(b, 0, [2, 3]), Chunk(a[8:], 8, [0, 1, 4])]))
        decode = ex._last_token_logits(ex.pack([Chunk(b[:1], 6, [2, 3]), Chunk(a[:1], 9, [0, 1, 4])]))
        outs.append((step, decode, opt.logits(torch.tensor([a, a]))))
    step, decode, full = outs[0]
    assert step.shape == (2, 256) and decode.shape == (2, 256) and full.shape == (2, 9, 256)
    for got, want in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_head_takes_rows_before_the_norm_quantizing_for_it(tiny_llama_dir, backend):
    """An FP8 LM head reads e4m3 rows and scales made by the final RMSNorm: that norm's inputs lose the rows."""
    fp8_head = CPU_F32 + ["quantization.algo=fp8", 'quantization.exclude=["*router*"]',
                          f"transforms.select_backends.backends.fused_add_rms_norm_quant_fp8={backend}"]
    on, off = (optimize_model(tiny_llama_dir, overrides=fp8_head + extra, progress=False) for extra in ([], [OFF]))
    assert _report(on).matched == {"gathered_lm_head": 1} and not _report(on).warnings
    taken = [n for n in on.gm.graph.nodes if n.target is take_rows]
    assert len(taken) == 2 and {u.target.name() for n in taken for u in n.users} == {
        BACKENDS["fused_add_rms_norm_quant_fp8"][backend].name()}
    chunks = [Chunk(list(range(3, 10)), 0, [0, 1]), Chunk(list(range(20, 25)), 0, [2, 3])]
    got, want = (ModelExecutor(o.gm)._last_token_logits(ModelExecutor(o.gm).pack(chunks)) for o in (on, off))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_take_rows_passes_all_rows_through_without_a_copy():
    x = torch.randn(1, 5, 3)
    assert take_rows(x, torch.arange(5)) is x
    torch.testing.assert_close(take_rows(x, torch.tensor([1, 4])), x[:, [1, 4]])


def test_through_soft_capping(tmp_path):
    """Gemma 2 caps its logits after the head (div, tanh, mul): per-row ops the rows pass through."""
    save_tiny_checkpoint(tmp_path, Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, final_logit_softcapping=30.0))
    on, off = (optimize_model(tmp_path, overrides=CPU_F32 + extra, progress=False) for extra in ([], [OFF]))
    assert _report(on).matched == {"gathered_lm_head": 1}
    chunks = [Chunk(list(range(3, 10)), 0, [0, 1]), Chunk(list(range(20, 25)), 0, [2, 3])]
    got, want = (ModelExecutor(o.gm)._last_token_logits(ModelExecutor(o.gm).pack(chunks)) for o in (on, off))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 30.0


def test_output_not_per_row_left_as_is_and_named(llama_off):
    """Logits reduced across rows after the head (not a per-row op): nothing is gathered, the report says so."""
    gm = torch.fx.GraphModule(llama_off.gm, llama_off.gm.graph.__deepcopy__())
    gm.meta.update(llama_off.gm.meta)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        summed = gm.graph.call_function(torch.ops.aten.cumsum.default, (output.args[0], 1))
    summed.meta["val"] = output.args[0].meta["val"]
    output.args = (summed,)
    transform = GatherLmHeadRows()
    assert transform.apply(gm, llama_off.ctx) == {"gathered_lm_head": 0}
    assert transform.expected(gm, llama_off.ctx) == {"gathered_lm_head": 1}
    assert not any(n.op == "placeholder" and n.name == "logit_rows" for n in gm.graph.nodes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_steps_give_the_tokens_of_the_ungathered_graph(tiny_llama_dir, tmp_path):
    """CUDA graphs of decode and prefill buckets replay the gather: greedy tokens as without it."""
    import shutil

    from autodeploy import LLM, SamplingParams
    from autodeploy.bench.tokenizer import synthetic_tokenizer

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    synthetic_tokenizer(256).save_pretrained(model_dir)  # LLM needs a tokenizer; the checkpoint has none
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 9, 17, 8, 30)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 20, 7, 25, 16)]
    outs = []
    for extra in ([], [OFF]):
        opt = optimize_model(model_dir, overrides=["model.device=cuda", "model.dtype=float32",
                                                   "transforms.insert_kv_cache.num_blocks=64",
                                                   "transforms.insert_kv_cache.block_size=8", *extra], progress=False)
        llm = LLM.from_optimized(opt, max_batch_size=8, cuda_graph_batch_sizes=(1, 2, 4, 8),
                                 cuda_graph_prefill_tokens=(16, 32, 64))
        assert llm.engine.executor.graphs is not None
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]
