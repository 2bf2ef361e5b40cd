"""Bad input gives one clear line on stderr and exit code 2, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "autodeploy", *args], capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autodeploy: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_hub_id():
    assert_clean_error(run_cli("optimize", "no-such-org/no-such-model"), "no-such-org/no-such-model")


def test_missing_folder():
    assert_clean_error(run_cli("optimize", "./definitely/not/here"), "does not exist")


def test_folder_without_config(tmp_path):
    assert_clean_error(run_cli("optimize", str(tmp_path)), "no config.json")


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    assert_clean_error(run_cli("optimize", str(tmp_path)), "not a causal language model")


def test_encoder_decoder_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    assert_clean_error(run_cli("optimize", str(tmp_path)), "not a causal language model")


def test_corrupt_safetensors(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_clean_error(run_cli("optimize", str(tmp_path)), "corrupt safetensors")


def test_missing_weights(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    assert_clean_error(run_cli("optimize", str(tmp_path)), "no *.safetensors")


def test_bad_recipe_key():
    assert_clean_error(run_cli("optimize", "transforms.load_weights.sed=1"), "transforms.load_weights.sed")


def test_verbose_shows_the_traceback():
    proc = run_cli("optimize", "./definitely/not/here", "--verbose")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("command", [[], ["optimize"]])
def test_help(command):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0 and "usage: autodeploy" in proc.stdout


def test_optimize_report_on_a_bare_checkpoint(tmp_path, tiny_llama_dir):
    report = tmp_path / "r.json"
    proc = run_cli("optimize", str(tiny_llama_dir), "--max-tokens", "4", "--no-progress", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["check"]["tokens_equal"] is True
    assert {t["name"] for t in data["transforms"]} >= {"load_weights"}
    assert all({"name", "enabled", "seconds", "matched"} <= set(t) for t in data["transforms"])


def test_config_only_runs_without_weights(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    proc = run_cli("optimize", str(tmp_path), "--config-only", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "random_init=" in proc.stdout


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-tokens", "-1", "max_tokens"), ("--temperature", "-2", "temperature"), ("--top-p", "0", "top_p")])
def test_bad_sampling_flag_fails_before_the_model_loads(flag, value, needle):
    """No model path that exists: the flag's error must come first, without the [autodeploy] optimizing line."""
    assert_clean_error(run_cli("generate", "./definitely/not/here", flag, value, "--prompt", "hi"), needle)


def test_override_value_that_is_not_yaml():
    assert_clean_error(run_cli("optimize", "./definitely/not/here", "quantization.exclude=[*router*]"), "quote")


@pytest.mark.parametrize("flags,needle", [
    (["--profile", "-1"], "--profile"), (["--num-requests", "0"], "--num-requests"), (["--repeats", "0"], "--repeats")])
def test_bad_bench_counts(flags, needle):
    assert_clean_error(run_cli("bench", "benchmarks/tiny-llama", "--config-only", *flags), needle)


def test_bench_prompt_past_max_seq_len():
    assert_clean_error(run_cli("bench", "benchmarks/tiny-llama", "--config-only", "--batch", "1", "--input-len",
                               "100000", "--output-len", "2"), "more than max_seq_len")


def test_bench_token_budget_past_the_graph():
    assert_clean_error(run_cli("bench", "benchmarks/tiny-llama", "--config-only", "--batch", "1", "--input-len", "8",
                               "--output-len", "2", "--max-num-tokens", "100000"), "exceeds the graph's export.max_seq_len")


def test_runtime_setting_out_of_range():
    assert_clean_error(run_cli("optimize", "benchmarks/tiny-llama", "--config-only", "runtime.max_seq_len=-4"),
                       "runtime.max_seq_len")


@pytest.mark.parametrize("flag,value", [("--window", "0"), ("--stride", "0"), ("--window", "1")])
def test_eval_ppl_window_and_stride_checked_first(flag, value):
    assert_clean_error(run_cli("eval-ppl", "./definitely/not/here", "--text", "README.md", flag, value), flag)
