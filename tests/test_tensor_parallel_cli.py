"""`autodeploy zoo --tensor-parallel-size N` and `autodeploy bench -tp N` on the CPU (gloo ranks)."""

import json

import pytest

from autodeploy.cli import main


def test_zoo_reports_an_entry_whose_heads_do_not_split_as_skipped(capsys, tmp_path):
    """MPT's tiny config has 3 heads: at TP 2 it is skipped with the reason, and the run passes."""
    assert main(["zoo", "-tp", "2", "--only", "mpt", "--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 entries, each over 2 ranks" in out
    assert "skipped: tensor_parallel_size 2 does not divide the model's heads (3 query heads" in out
    (entry,) = json.loads((tmp_path / "zoo.json").read_text())
    assert entry["passed"] and entry["skipped"].endswith("sizes that work: 1, 3") and entry["tokens_equal"] is None
    assert main(["zoo", "-tp", "0", "--only", "mpt"]) == 2


@pytest.mark.slow
def test_zoo_entry_over_two_ranks_matches_hf(tmp_path):
    """Llama 3.1 (GQA) sharded over 2 gloo ranks: stages from rank 0's reports, tokens and logits vs HF."""
    assert main(["zoo", "-tp", "2", "--only", "llama-3.1", "--report", str(tmp_path)]) == 0
    (entry,) = json.loads((tmp_path / "zoo.json").read_text())
    assert entry["tokens_equal"] and entry["max_rel_logit_diff"] <= entry["tolerance"]
    assert entry["matched"]["shard_tensor_parallel"]["attention"] == 2
    assert all(stage["status"] in ("ok", "n/a") for stage in entry["stages"].values()), entry["stages"]


@pytest.mark.slow
def test_bench_over_two_ranks_reports_rank_0(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "benchmarks/tiny-llama", "--config-only", "-tp", "2", "--batch", "1,2", "--input-len", "8",
                 "--output-len", "4", "--repeats", "1", "--warmup", "0", "--json", str(out), "model.device=cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["tensor_parallel_size"] == 2 and result["transforms"]["shard_tensor_parallel"]["row"] > 0
    runs = result["results"]["autodeploy-tp2"]
    assert len(runs) == 2 and all(m["output_tok_s"] > 0 for m in runs.values())
