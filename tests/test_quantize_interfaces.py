"""Quantization interfaces: --quantization / --kv-cache-dtype on every command, LLM(quantization=...),
the optimize report, and one-line errors with exit code 2 for bad input."""

import json

import pytest
from transformers import LlamaConfig

from autodeploy.cli import build_parser, main
from conftest import save_tiny_checkpoint
from quant_fixtures import write_gptq

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
QUIET = ["--max-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny_checkpoint(path, LlamaConfig(**CONFIG))
    return path


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq")
    write_gptq(path, LlamaConfig(**CONFIG))
    return path


@pytest.mark.parametrize("command", ["optimize", "generate", "chat", "serve", "bench"])
def test_every_command_takes_the_flags(command):
    extra = ["--prompt", "x"] if command == "generate" else []
    args = build_parser().parse_args([command, "m", "--quantization", "int4", "--kv-cache-dtype", "fp8", *extra])
    assert (args.quantization, args.kv_cache_dtype) == ("int4", "fp8")


def test_kv_cache_dtype_reaches_insert_kv_cache():
    from autodeploy.recipe import load_recipe

    assert load_recipe(None, ["quantization.kv_cache_dtype=fp8"]).transforms["insert_kv_cache"].dtype == "fp8"
    assert load_recipe(None, []).transforms["insert_kv_cache"].dtype == "auto"


def _one_line_error(capsys, argv, expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("autodeploy: error:") and expected in err, err


def test_unknown_scheme(capsys, llama_dir):
    _one_line_error(capsys, ["optimize", str(llama_dir), "--quantization", "fp4", *QUIET],
                    "unknown quantization algo 'fp4' (supported: auto, none, fp8, int8, int4)")
    _one_line_error(capsys, ["optimize", str(llama_dir), "--kv-cache-dtype", "int8", *QUIET],
                    "unknown quantization kv_cache_dtype 'int8'")
    _one_line_error(capsys, ["optimize", str(llama_dir), "quantization.act_quant=block", *QUIET],
                    "unknown quantization act_quant 'block' (supported: token, tensor, group)")
    _one_line_error(capsys, ["optimize", str(llama_dir), "quantization.act_group_size=96", *QUIET],
                    "quantization act_group_size must be a power of two >= 16")


def test_group_size_not_dividing_in_features(capsys, llama_dir):
    _one_line_error(capsys, ["optimize", str(llama_dir), "--quantization", "int4", "quantization.group_size=48", *QUIET],
                    "group size 48 does not divide in_features 64")


def test_fp8_asked_of_an_int4_checkpoint(capsys, gptq_dir):
    _one_line_error(capsys, ["optimize", str(gptq_dir), "--quantization", "fp8", *QUIET],
                    "the checkpoint is already quantized (gptq int4 group 32); quantization 'fp8' contradicts it")


def test_unsupported_checkpoint_scheme(capsys, tmp_path, llama_dir):
    for f in llama_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _one_line_error(capsys, ["optimize", str(tmp_path), *QUIET],
                    "unsupported quantization scheme in the checkpoint: bitsandbytes checkpoints (supported: ")


def test_optimize_skips_the_hf_check_where_hf_cannot_load(capsys, gptq_dir):
    assert main(["optimize", str(gptq_dir), "--max-tokens", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "agreement  : skipped, HF transformers cannot load this checkpoint here" in out
    assert "gptq_int4_linear=7" in out and "fused_int_linear=2" in out and "warning" not in out


def test_optimize_reports_counts_and_bytes(tmp_path, llama_dir, capsys):
    report = tmp_path / "report.json"
    assert main(["optimize", str(llama_dir), "--quantization", "fp8", "--report", str(report), *QUIET]) == 0
    assert "fp8_linear=7" in capsys.readouterr().out
    quantize = next(t for t in json.loads(report.read_text())["transforms"] if t["name"] == "quantize_linear")
    assert quantize["matched"]["fp8_linear"] == 7
    assert 0 < quantize["matched"]["weight_bytes_after"] < quantize["matched"]["weight_bytes_before"]


def test_llm_quantization_keyword(llama_dir):
    from autodeploy import LLM, SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0)
    plain = LLM(llama_dir).generate([[3, 17, 42, 9]], params)[0].token_ids
    llm = LLM(llama_dir, quantization="int8", **{"quantization.group_size": -1})
    ops = [str(n.target) for n in llm.model.gm.graph.nodes if n.op == "call_function"]
    assert ops.count("autodeploy.int_linear.default") == 4  # q/k/v and gate/up fused
    assert llm.generate([[3, 17, 42, 9]], params)[0].token_ids == plain  # int8 per channel: same greedy


@pytest.mark.slow
@pytest.mark.parametrize("algo,fallbacks", [("int4", 180), ("int8", 0)])
def test_smollm2_runs_with_the_default_group_sizes(capsys, default_model_dir, algo, fallbacks):
    """576 columns: int4's group 128 falls back to 64 for the six projections reading them (down_proj keeps
    128), int8 is per channel; both optimize with the defaults."""
    assert main(["optimize", str(default_model_dir), "--quantization", algo, *QUIET]) == 0
    out = capsys.readouterr().out
    assert f"{algo}_linear=210" in out and "qkv=30, gate_up=30, fused_int_linear=60" in out
    assert (f"group_size_fallbacks={fallbacks}" in out) == bool(fallbacks) and ("warning" in out) == bool(fallbacks)
