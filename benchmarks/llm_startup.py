"""Seconds from `LLM(...)` to the first token of a 128-token prompt (issue 4: <= 60 s for the 8B shape).

Usage: python benchmarks/llm_startup.py CONFIG_DIR [key=value ...] > startup.json
A copy of CONFIG_DIR gets a synthetic tokenizer (the config folder ships none); weights are random
(model.config_only=true). Run it with a fresh TRITON_CACHE_DIR to count kernel compilation too.
"""

import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path


from autodeploy import LLM, SamplingParams
from autodeploy.bench.tokenizer import synthetic_tokenizer
from autodeploy.loading import load_config


def main(config_dir: str, overrides: list[str]) -> dict:
    model_dir = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(config_dir, model_dir)
    vocab = load_config(model_dir).vocab_size
    synthetic_tokenizer(vocab).save_pretrained(model_dir)
    prompt = [random.Random(0).randrange(vocab) for _ in range(128)]

    start = time.perf_counter()
    llm = LLM(model_dir, overrides=["model.config_only=true", *overrides])
    built = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    first = time.perf_counter()
    graphs = llm.engine.executor.graphs
    return {"llm_init_s": built - start, "first_token_s": first - start, "optimize_s": llm.model.seconds,
            "cuda_graph_sizes": graphs.sizes if graphs is not None else []}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:]), indent=2))
