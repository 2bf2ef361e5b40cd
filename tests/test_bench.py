"""`autodeploy bench` on a tiny random model (CPU), and CUDA-graph decode against eager (GPU)."""

import argparse
import json

import pytest
import torch

from autodeploy.bench.metrics import Run, percentile, summarize
from autodeploy.bench.workload import from_file, parse_range, random_lengths, random_prompts, shared_prefix
from autodeploy.cli_bench import register
from autodeploy.runtime.cuda_graphs import buckets_to_capture

SMALL_CACHE = "transforms.insert_kv_cache.num_blocks=64"


def bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: one thread is faster


def test_latency_mode_with_hf_baseline(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    assert bench([str(tiny_llama_dir), SMALL_CACHE, "model.device=cpu", "--batch", "1,3", "--input-len", "12",
                  "--output-len", "6", "--baseline", "hf", "--repeats", "2", "--profile", "2", "--profile-prefill", "1",
                  "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("device", "torch", "transformers", "copy_bandwidth_GBps", "weight_bytes", "ceiling_batch1_tok_s",
                "build_s", "engine", "date"):
        assert key in result
    names = [w["name"] for w in result["workloads"]]
    assert names == ["latency b=1 in=12 out=6", "latency b=3 in=12 out=6"]
    for runner in ("hf", "autodeploy"):
        for name in names:
            m = result["results"][runner][name]
            assert m["output_tok_s"] > 0 and m["runs"] == 2
            assert set(m["itl_ms"]) == {"mean", "p50", "p90", "p99"} and set(m["ttft_ms"]) == set(m["itl_ms"])
    assert result["profile"]["autodeploy"][names[0]]["top"]
    prefill = result["prefill_profile"]["autodeploy"][names[1]]
    assert prefill["prompt_tokens"] == 36 and prefill["passes"] == 1 and prefill["top"] and prefill["wall_ms_per_pass"] > 0


def test_throughput_mode_config_only(tiny_llama_dir, tmp_path):
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps([[5, 3], {"input_len": 20, "output_len": 7}, [33, 1]]))
    out = tmp_path / "bench.json"
    assert bench([str(tiny_llama_dir), SMALL_CACHE, "model.device=cpu", "--config-only", "--lengths-file",
                  str(lengths), "--max-batch-size", "2", "--max-num-tokens", "24", "--repeats", "1",
                  "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config_only"] and result["max_batch_size"] == 2
    (workload,) = result["workloads"]
    assert workload["mode"] == "throughput" and workload["output_tokens"] == 11
    assert result["results"]["autodeploy"][workload["name"]]["output_tok_s"] > 0


def test_peers_only_measures_the_baselines_alone(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench([str(tiny_llama_dir), "model.device=cpu", "--config-only", "--num-requests", "3",
                  "--input-len-range", "4,9", "--output-len-range", "2,4", "--baseline", "hf", "--peers-only",
                  "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["results"]) == ["hf"] and "weight_bytes" not in result
    assert "peers only" in capsys.readouterr().out
    with pytest.raises(Exception, match="--peers-only"):
        bench([str(tiny_llama_dir), "model.device=cpu", "--peers-only"])


def test_shared_prefix_mode_measures_prefix_caching_on_and_off(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench([str(tiny_llama_dir), SMALL_CACHE, "model.device=cpu", "--shared-prefix", "40", "--num-requests", "3",
                  "--input-len", "5", "--output-len", "2", "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (workload,) = result["workloads"]
    assert workload["mode"] == "shared-prefix" and workload["requests"] == 3
    on, off = (result["engine"][r]["stats"] for r in ("autodeploy", "autodeploy-no-prefix-cache"))
    assert on["prefix_cache_hit_tokens"] >= 3 * 32 and off["prefix_cache_hit_tokens"] == 0
    assert on["prompt_tokens_computed"] < off["prompt_tokens_computed"]
    assert "autodeploy-no-prefix-cache" in capsys.readouterr().out


def test_metrics_and_workloads():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    m = summarize([Run([[0.5, 0.6, 0.8], [0.5, 0.7]], wall_s=1.0)])
    assert m["output_tok_s"] == 5 and m["ttft_ms"]["p50"] == 500
    assert m["itl_ms"]["mean"] == pytest.approx(500 / 3)
    assert parse_range("3,9") == (3, 9) and parse_range("4") == (4, 4)
    with pytest.raises(ValueError):
        parse_range("9,3")
    w = random_lengths(20, (2, 5), (1, 3), seed=1)
    assert all(2 <= r.input_len <= 5 and 1 <= r.output_len <= 3 for r in w.requests)
    a, b = random_prompts(shared_prefix(2, 6, 3, 1), vocab_size=1000)
    assert a[:6] == b[:6] and len(a) == len(b) == 9 and a[6:] != b[6:]
    with pytest.raises(ValueError):
        shared_prefix(2, 0, 3, 1)


def test_buckets_to_capture():
    sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert buckets_to_capture(sizes, max_batch_size=48, max_num_tokens=2048) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_to_capture(sizes, max_batch_size=64, max_num_tokens=16) == [1, 2, 4, 8, 16]
    assert buckets_to_capture((), 64, 2048) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager(tiny_llama_dir, tmp_path):
    """Same greedy tokens with and without graphs: batches of 1..5 sequences (padded buckets), prompts
    of different lengths across block boundaries, requests finishing at different steps."""
    import shutil

    from autodeploy import LLM, SamplingParams
    from autodeploy.bench.tokenizer import synthetic_tokenizer
    from autodeploy.optimizer import optimize_model

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    synthetic_tokenizer(256).save_pretrained(model_dir)  # LLM needs a tokenizer; the checkpoint has none
    opt = optimize_model(model_dir, overrides=["model.device=cuda", "model.dtype=float32",
                                                    "transforms.insert_kv_cache.num_blocks=64",
                                                    "transforms.insert_kv_cache.block_size=8"], progress=False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 9, 17, 8, 30)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 20, 7, 25, 16)]

    def tokens(**settings):
        llm = LLM.from_optimized(opt, max_batch_size=8, **settings)
        outs = [[o.token_ids for o in llm.generate(prompts[:k], params[:k])] for k in (1, 5)]
        return outs, llm.engine.executor.graphs

    graphed, graphs = tokens(cuda_graph_batch_sizes=(1, 2, 4, 8), cuda_graph_prefill_tokens=(16, 32, 64))
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]
    assert [(b.tokens, b.seqs) for b in graphs.buckets if not b.decode] == [(16, 8), (32, 9), (64, 9)]
    eager, none = tokens(cuda_graph_batch_sizes=(), cuda_graph_prefill_tokens=())
    assert none is None
    assert graphed == eager


def test_bytes_read_per_token(tiny_llama_dir):
    """A decode token reads every weight but one row of the (untied) embedding table; a tied table is
    read whole (it is the LM head)."""
    from autodeploy.bench.device import bytes_by_dtype, bytes_read_per_token
    from autodeploy.graph_utils import weight_bytes
    from autodeploy.optimizer import optimize_model

    opt = optimize_model(tiny_llama_dir, overrides=["model.device=cpu", SMALL_CACHE], progress=False)
    table = opt.gm.get_parameter("model.model.embed_tokens.weight")  # [256, 64] float32, untied
    total = weight_bytes(opt.gm)
    assert bytes_by_dtype(opt.gm) == {"float32": total}
    assert bytes_read_per_token(opt.gm) == total - table.numel() * 4 + 64 * 4
    opt.gm.model.lm_head.weight = table  # tie: the gathered table is also the LM head's weight
    assert bytes_read_per_token(opt.gm) == weight_bytes(opt.gm)


@pytest.mark.parametrize("algo", ["none", "fp8"])
def test_bytes_read_per_token_counts_the_routed_experts(tmp_path, algo):
    """A MoE token reads k of E experts' slices of every stacked expert tensor (codes and scales alike)."""
    from transformers import Qwen3MoeConfig

    from autodeploy.bench.device import bytes_read_per_token
    from autodeploy.graph_utils import weight_bytes
    from autodeploy.optimizer import optimize_model
    from conftest import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path, Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, head_dim=16,
        max_position_embeddings=128))
    opt = optimize_model(tmp_path, overrides=["model.device=cpu", SMALL_CACHE, f"quantization.algo={algo}"],
                         progress=False)
    params = dict(opt.gm.named_parameters())
    experts = {n: p for n, p in params.items() if ".experts." in n}
    assert experts and all(p.shape[0] == 8 for p in experts.values())
    expert_bytes = sum(p.numel() * p.element_size() for p in experts.values())
    table = params["model.model.embed_tokens.weight"]
    want = weight_bytes(opt.gm) - expert_bytes + expert_bytes * 2 // 8 - table.numel() * table.element_size() \
        + table[0].numel() * table.element_size()
    assert bytes_read_per_token(opt.gm) == want


def test_quantized_bench_reports_scheme_and_ceiling(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "int4.json"
    assert bench([str(tiny_llama_dir), SMALL_CACHE, "model.device=cpu", "quantization.algo=int4",
                  "quantization.group_size=32", "--batch", "1", "--input-len", "4", "--output-len", "3",
                  "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    assert "quantization int4 (group 32); weights" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["quantization"]["algo"] == "int4" and "int32" in r["weight_bytes_by_dtype"]
    unquantized = sum(t.numel() * 4 for t in load_file(tiny_llama_dir / "model.safetensors").values())
    assert r["bytes_per_token"] < unquantized / 2  # float32 linears -> 4-bit codes + scales
    assert r["ceiling_batch1_tok_s"] == pytest.approx(r["copy_bandwidth_GBps"] * 1e9 / r["bytes_per_token"])


def test_bench_prints_the_transforms_warnings(tiny_llama_dir, tmp_path, capsys):
    """INT4's default group (128) does not divide the tiny model's hidden size (64): the fallback's warning shows."""
    out = tmp_path / "int4.json"
    assert bench([str(tiny_llama_dir), SMALL_CACHE, "model.device=cpu", "quantization.algo=int4", "--batch", "1",
                  "--input-len", "4", "--output-len", "2", "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    warnings = json.loads(out.read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("quantize_linear: group size 128 does not divide")
    assert f"  warning: {warnings[0]}" in capsys.readouterr().out


def test_print_warnings_puts_each_on_stderr(capsys):
    from types import SimpleNamespace

    from autodeploy.cli import print_warnings

    print_warnings([SimpleNamespace(warnings=["a: one", "a: two"]), SimpleNamespace(warnings=[])])
    assert capsys.readouterr().err == "[autodeploy] warning: a: one\n[autodeploy] warning: a: two\n"


@pytest.mark.parametrize("text", ["not json", "[[4, 2], [3]]", '[[4, "x"]]', '[{"input_len": 3}]', "[]", "[[0, 2]]"])
def test_lengths_file_errors_name_the_file(tmp_path, text):
    path = tmp_path / "lengths.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="lengths.json: want a non-empty JSON list"):
        from_file(path)


def test_missing_lengths_file(tmp_path):
    with pytest.raises(ValueError, match="No such file"):
        from_file(tmp_path / "nope.json")
