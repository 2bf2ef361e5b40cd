"""benchmarks/serve_load.py --shape: a config-only shape (the 8B's has no tokenizer) served with SmolLM2's
tokenizer and vocabulary, so the serving load can run at the 8B shape on a GPU."""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_shape_takes_the_config_and_smollm2s_tokenizer(default_model_dir):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import serve_load
    finally:
        sys.path.remove(str(BENCHMARKS))
    shape = json.loads((BENCHMARKS / "llama-3.1-8b" / "config.json").read_text())
    smol = json.loads((default_model_dir / "config.json").read_text())
    out = Path(serve_load.shaped_model_dir(str(BENCHMARKS / "llama-3.1-8b")))
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == shape["hidden_size"] and config["num_hidden_layers"] == shape["num_hidden_layers"]
    assert config["vocab_size"] == smol["vocab_size"] != shape["vocab_size"]
    assert config["eos_token_id"] == smol["eos_token_id"]
    ids = AutoTokenizer.from_pretrained(out)("To be, or not to be").input_ids
    assert ids and max(ids) < config["vocab_size"]
