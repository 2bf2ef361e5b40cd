"""benchmarks/gpu_correctness.py end to end on CPU: a tiny random Llama in float32, where ours and HF
eager on the same saved weights must agree to float32 noise (the GPU run uses bf16 and real shapes)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_correctness.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_correctness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_correctness = _load_script()


def test_tiny_llama_float32_cpu(tmp_path):
    from transformers import LlamaConfig

    config_dir = tmp_path / "config"
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512).save_pretrained(config_dir)
    report, workdir = tmp_path / "report.json", tmp_path / "work"
    workdir.mkdir()
    status = gpu_correctness.main([str(config_dir), "--config-only", "--dtype", "float32", "--device", "cpu",
                                   "--workdir", str(workdir), "--json", str(report)])
    r = json.loads(report.read_text())
    assert status == 0 and r["passed"]
    assert r["prompt_kind"] == "random ids" and len(r["prompt_lens"]) == 8
    for side in ("on_ours_sequences", "on_hf_sequences", "ours_self", "hf_self"):
        s = r[side]
        assert s["positions"] == 8 * 64 and s["top_k_failures"] == 0
        assert s["argmax_mismatches"] == 0  # float32: same weights, same tokens, decode path == one forward
        assert s["max_abs_logprob_diff"] < 1e-4
    assert r["ours_tokens"] == r["hf_tokens"] and r["first_divergence_step"] == [None] * 8
    assert r["at_first_divergence"] == [] and r["first_divergence_passed"]
    assert r["notes"]  # std-0.02 init on 64 dims: near-flat distributions, said so
    assert not any(workdir.iterdir())  # the saved checkpoint is deleted


def test_judged_flags_tokens_outside_top_k():
    judge = torch.log_softmax(torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3), dim=-1)
    producer = judge.clone()
    producer[2, 4] += 0.5
    judged = gpu_correctness.Judged()
    producer_chosen = gpu_correctness.picked(producer, [0, 1, 4])  # the producer's logprob of its tokens
    judged.add(prompt=0, tokens=[0, 1, 4], producer=producer_chosen, judge=judge, top_k=2)
    s = judged.summary()
    assert (s["positions"], s["argmax_mismatches"], s["top_k_failures"], s["max_rank"]) == (3, 2, 1, 4)
    assert s["failures"] == [{"prompt": 0, "step": 2, "token": 4, "rank": 4}]
    assert abs(s["max_abs_logprob_diff"] - 0.5) < 1e-6


def test_ranks_where_the_decodes_first_part():
    on_ours, on_hf = gpu_correctness.Judged(), gpu_correctness.Judged()
    on_ours.ranks, on_hf.ranks = [0, 0, 1, 7, 0, 0, 0, 0], [0, 0, 2, 0, 0, 0, 0, 0]  # 2 prompts x 4 tokens
    parting = gpu_correctness.at_first_divergence([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 9], [5, 6, 7, 8]],
                                                  on_ours, on_hf, new_tokens=4)
    # prompt 0 parts at step 2 (the later rank-7 position is after the parting); prompt 1 never parts
    assert parting == [{"prompt": 0, "step": 2, "ours_rank_in_hf": 1, "hf_rank_in_ours": 2}]
